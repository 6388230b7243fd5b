"""Debug commands over the pinned maps (read without bcc) and ``pod exec`` for dev-mode pods.

Entry points: ``bpf`` (group: ``ct list global``, ``policy get``, ``ipcache list``), ``pod``
(group: ``exec NS/NAME -- CMD...``) and ``monitor`` (the raw event stream).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .core.conntrack import CTFlag
from .core.events import PROTO_NAMES
from .maps import PIN_ROOT, NodeMaps
from .monitor import MonitorType
from .sandbox import default_state_dir, pod_exec, read_record


def _nodes(node: str | None, root: Path) -> Iterator[tuple[str, NodeMaps]]:
    dirs = [root / node] if node else sorted(p for p in root.glob("*") if (p / "cil_lxc").exists())
    for d in dirs:
        maps = NodeMaps.open(d)
        try:
            yield d.name, maps
        finally:
            maps.close()


def _out(rows: list[dict[str, Any]], fmt: str, line: Any) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            click.echo(line(r))


node_opt = click.option("--node", default=None, help="node name (default: every node)")
root_opt = click.option("--pin-root", type=click.Path(path_type=Path), default=PIN_ROOT,
                        show_default=True)
out_opt = click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")


@click.group()
def bpf() -> None:
    """Inspect the datapath's BPF maps as loaded."""


@bpf.group()
def ct() -> None:
    """Connection tracking tables."""


@ct.command("list")
@click.argument("scope", type=click.Choice(["global"]))
@node_opt
@root_opt
@out_opt
def ct_list(scope: str, node: str | None, pin_root: Path, output: str) -> None:
    """List conntrack entries, as ``cilium bpf ct list global``."""
    rows = []
    for name, maps in _nodes(node, pin_root):
        for _, e in maps.ct_entries():
            rows.append({"node": name, "proto": PROTO_NAMES.get(e.proto, str(e.proto)),
                         "src": f"{e.saddr}:{e.sport}", "dst": f"{e.daddr}:{e.dport}",
                         "direction": e.direction.name, "packets": e.packets, "bytes": e.bytes,
                         "flags": [f.name for f in CTFlag if f and e.flags & f],
                         "local_identity": e.local_identity,
                         "peer_identity": e.peer_identity, "last_seen_ns": e.last_seen_ns})
    _out(rows, output, lambda r: (
        f"{r['proto']} {r['direction'].lower()} {r['src']} -> {r['dst']} "
        f"packets={r['packets']} bytes={r['bytes']} flags={','.join(r['flags']) or '-'} "
        f"identity={r['local_identity']}<->{r['peer_identity']}"))


@bpf.group()
def policy() -> None:
    """Policy map."""


@policy.command("get")
@click.argument("identity", type=int, required=False)
@node_opt
@root_opt
@out_opt
def policy_get(identity: int | None, node: str | None, pin_root: Path, output: str) -> None:
    """Policy entries (all, or those of one local IDENTITY) with packet/byte counters."""
    rows = []
    for name, maps in _nodes(node, pin_root):
        for k, v, packets, nbytes in sorted(maps.policy_entries(), key=lambda t: t[0]):
            if identity is not None and k.local_identity != identity:
                continue
            rows.append({"node": name, "identity": k.local_identity,
                         "direction": k.direction.name, "peer": k.peer, "proto": k.proto,
                         "port": k.port, "port_prefixlen": k.port_prefixlen,
                         "verdict": "deny" if v.deny else "allow", "packets": packets,
                         "bytes": nbytes})
    _out(rows, output, lambda r: (
        f"{r['identity']:<8} {r['direction']:<8} {r['verdict']:<6} peer={r['peer'] or 'ANY'} "
        f"proto={r['proto'] or 'ANY'} port={r['port'] or 'ANY'}/{r['port_prefixlen']} "
        f"packets={r['packets']} bytes={r['bytes']}"))


@bpf.group()
def ipcache() -> None:
    """IP -> identity map."""


@ipcache.command("list")
@node_opt
@root_opt
@out_opt
def ipcache_list(node: str | None, pin_root: Path, output: str) -> None:
    rows = [{"node": name, "prefix": f"{k.ip}/{k.prefixlen}", "identity": ident}
            for name, maps in _nodes(node, pin_root)
            for k, ident in sorted(maps.ipcache_entries().items())]
    _out(rows, output, lambda r: f"{r['prefix']:<20} identity={r['identity']}")


@click.group()
def pod() -> None:
    """Dev-mode pods."""


@pod.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("target")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
def exec_(target: str, cmd: tuple[str, ...], state_dir: Path | None) -> None:
    """Run CMD in pod NS/NAME (its network namespace and cgroup); exit code passed through."""
    namespace, sep, name = target.partition("/")
    if not sep or not namespace or not name:
        raise click.BadParameter("expected NS/NAME", param_hint="TARGET")
    try:
        rec = read_record(state_dir or default_state_dir(), namespace, name)
    except LookupError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(pod_exec(rec, list(cmd)))


@click.command()
@click.option("-t", "--type", "types", multiple=True,
              type=click.Choice([t.value for t in MonitorType]),
              help="only these event types (repeatable; default all)")
@click.option("--related-to", "related_to", multiple=True, type=int,
              help="only events to or from this endpoint ID (repeatable)")
@click.option("--node", "nodes", multiple=True, help="only this node's events (repeatable)")
@click.option("-n", "--numeric", is_flag=True, help="reserved identities as numbers")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.option("--max-events", type=int, default=0, help="stop after this many (0 = follow)")
def monitor(types: tuple[str, ...], related_to: tuple[int, ...], nodes: tuple[str, ...],
            numeric: bool, output: str, max_events: int) -> None:
    """The datapath's raw event stream (drops, traces, policy verdicts), as cilium monitor."""
    import asyncio
    import contextlib

    from ciliate.client import ContextMissing, connect_bus

    from .monitor import follow

    async def run() -> None:
        try:
            bus = await connect_bus(name="ciliate-monitor")
        except ContextMissing as e:
            raise click.ClickException(str(e)) from None
        try:
            if output == "text":
                click.echo("Listening for events on flows.* (press Ctrl-C to quit)", err=True)
            await follow(bus, click.echo, nodes=nodes, types=[MonitorType(t) for t in types],
                         related_to=related_to, output=output, numeric=numeric,
                         max_events=max_events)
        finally:
            await bus.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
