"""``bpf lb list`` and ``bpf lb maglev list``: the LB maps as loaded, printed the way
``cilium-dbg bpf lb list`` / ``bpf lb maglev list`` print them. Reads the pinned maps with
``bpf(2)`` (no bcc). Entry point: ``bpf-lb = "services.datapath.lb.cli:bpf"`` (merged into the
``bpf`` group of services.datapath.cli by the plugin loader).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..maps import PIN_ROOT
from .core.model import PROTO_NAMES, SvcFlag, table_backend_ids
from .maps import LbMaps, backend_val_py, svc_key_py, svc_val_py

TYPE_NAMES = (
    (SvcFlag.CLUSTER_IP, "ClusterIP"), (SvcFlag.NODEPORT, "NodePort"),
    (SvcFlag.LOADBALANCER, "LoadBalancer"), (SvcFlag.EXTERNAL_IP, "ExternalIPs"),
)


def _nodes(node: str | None, root: Path,
           maglev_m: int = 16381) -> Iterator[tuple[str, LbMaps]]:
    dirs = ([root / f"{node}-lb"] if node else
            sorted(p for p in root.glob("*-lb") if (p / "lb4_services").exists()))
    for d in dirs:
        maps = LbMaps.open(d, maglev_m)
        try:
            yield d.name.removesuffix("-lb"), maps
        finally:
            maps.close()


def _flags_text(flags: SvcFlag) -> str:
    words = [name for f, name in TYPE_NAMES if flags & f]
    if flags & SvcFlag.LOCAL_SCOPE:
        words.append("Local")
    if flags & SvcFlag.AFFINITY:
        words.append("sessionAffinity")
    if flags & SvcFlag.CLUSTER_IP:
        words.append("non-routable")
    return ", ".join(words)


def lb_rows(maps: LbMaps) -> list[dict[str, Any]]:
    """One row per frontend: its master entry and the backend in each slot."""
    backends = {int(k.id): v for k, v in maps.backends.items()}
    services: dict[tuple[str, int, int], dict[str, Any]] = {}
    for kc, vc in maps.services.items():
        k, v = svc_key_py(kc), svc_val_py(vc)
        fe = f"{k.address}:{k.port}/{PROTO_NAMES.get(k.proto, k.proto)}"
        row = services.setdefault((k.address, k.port, k.proto), {
            "service": fe, "rev_nat_id": v.rev_nat, "backends": []})
        if k.slot == 0:
            row.update(count=v.count, flags=_flags_text(v.flags), table_id=v.table_id,
                       affinity_timeout=v.affinity_timeout)
        else:
            bc = backends.get(v.backend_id)
            b = backend_val_py(bc) if bc is not None else None
            addr = (f"{b.address}:{b.port}/{PROTO_NAMES.get(b.proto, b.proto)}" if b
                    else "<missing>")
            row["backends"].append({"slot": k.slot, "backend_id": v.backend_id,
                                    "address": addr})
    rows = [services[k] for k in sorted(services)]
    for r in rows:
        r["backends"].sort(key=lambda b: b["slot"])
    return rows


node_opt = click.option("--node", default=None, help="node name (default: every node)")
root_opt = click.option("--pin-root", type=click.Path(path_type=Path), default=PIN_ROOT,
                        show_default=True)
out_opt = click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")


@click.group()
def bpf() -> None:
    """Inspect the datapath's BPF maps as loaded."""


@bpf.group("lb")
def lb() -> None:
    """Load-balancing maps (services, backends, reverse NAT, Maglev)."""


@lb.command("list")
@node_opt
@root_opt
@out_opt
def lb_list(node: str | None, pin_root: Path, output: str) -> None:
    """Frontends and the backend in each slot (``cilium-dbg bpf lb list``)."""
    result: dict[str, list[dict[str, Any]]] = {}
    for name, maps in _nodes(node, pin_root):
        result[name] = lb_rows(maps)
    if output == "json":
        click.echo(json.dumps(result, indent=2))
        return
    for name, rows in result.items():
        if len(result) > 1:
            click.echo(f"# node {name}")
        click.echo(f"{'SERVICE ADDRESS':<30}BACKEND ADDRESS (REVNAT_ID) (SLOT)")
        for r in rows:
            lead = f"{r['service']} ({r['rev_nat_id']})"
            click.echo(f"{lead:<30}0.0.0.0:0 ({r['rev_nat_id']}) (0) [{r.get('flags', '')}]")
            for b in r["backends"]:
                click.echo(f"{'':<30}{b['address']} ({r['rev_nat_id']}) ({b['slot']})")


@lb.group("maglev")
def maglev() -> None:
    """Maglev lookup tables."""


@maglev.command("list")
@node_opt
@root_opt
@out_opt
@click.option("--maglev-m", type=int, default=16381, show_default=True,
              help="table size the programs were compiled with")
def maglev_list(node: str | None, pin_root: Path, output: str, maglev_m: int) -> None:
    """Per service (rev-NAT id): its table's backend ids (``cilium-dbg bpf lb maglev list``)."""
    result: dict[str, dict[str, list[int]]] = {}
    for name, maps in _nodes(node, pin_root, maglev_m):
        per_svc: dict[str, list[int]] = {}
        tables: dict[int, list[int]] = {}
        for r in lb_rows(maps):
            tid = r.get("table_id", 0)
            if not tid:
                continue
            if tid not in tables:
                raw = maps.maglev_table(tid)
                tables[tid] = table_backend_ids(raw) if raw is not None else []
            per_svc[str(r["rev_nat_id"])] = tables[tid]
        result[name] = per_svc
    if output == "json":
        click.echo(json.dumps(result))
        return
    for name, per in result.items():
        if len(result) > 1:
            click.echo(f"# node {name}")
        click.echo(f"{'SVC ID':<10}LOOKUP TABLE")
        for sid in sorted(per, key=int):
            click.echo(f"{sid:<10}[ {' '.join(map(str, per[sid]))} ]")
