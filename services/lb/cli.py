"""``ciliate service list|get`` as ``cilium-dbg service list`` prints it, and
``ciliate lb maglev get NS/NAME``: the Maglev tables the lb service computed (the loaded maps
are ``bpf lb ...``, the datapath's)."""

from __future__ import annotations

from typing import Any

import click

from ciliate.cli.output import OUTPUT_OPTION, echo_json, fail, run, table
from ciliate.client import Client


async def _get(path: str) -> Any:
    async with Client.from_context() as client:
        return await client.get("lb", path)


def _addr(address: str, port: int, protocol: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{protocol}"


def frontend_rows(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per frontend with its numbered backends, ordered by frontend id (Cilium's)."""
    rows = []
    for svc in services:
        for fe in svc["frontends"]:
            backends = [b for b in svc["backends"] if b["port_name"] == fe["port_name"]]
            rows.append({
                "id": fe["id"],
                "frontend": _addr(fe["address"], fe["port"], fe["protocol"]),
                "type": fe["type"],
                "scope": fe["scope"],
                "service": f"{svc['namespace']}/{svc['name']}",
                "backends": [{"id": b["id"],
                              "address": _addr(b["address"], b["port"], b["protocol"]),
                              "state": b["state"], "weight": b["weight"]} for b in backends],
            })
    return sorted(rows, key=lambda r: r["id"])


def render_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        backends = [f"{n} => {b['address']} ({b['state']})"
                    for n, b in enumerate(row["backends"], start=1)] or [""]
        lines.append([row["id"], row["frontend"], row["type"], backends[0]])
        lines += [["", "", "", b] for b in backends[1:]]
    return table(["ID", "Frontend", "Service Type", "Backend"], lines)


@click.group("service")
def service() -> None:
    """Load-balanced Services: frontends and backends with their states."""


@service.command("list")
@OUTPUT_OPTION
def service_list(output: str) -> None:
    rows = frontend_rows(run(_get("/v1/lb/services")))
    click.echo(render_rows(rows)) if output == "table" else echo_json(rows)


@service.command("get")
@click.argument("ref")
@OUTPUT_OPTION
def service_get(ref: str, output: str) -> None:
    """REF: a frontend ID (as ``service list`` shows) or NAMESPACE/NAME."""
    if ref.isdigit():
        rows = [r for r in frontend_rows(run(_get("/v1/lb/services"))) if r["id"] == int(ref)]
    else:
        namespace, _, name = ref.rpartition("/")
        rows = frontend_rows([run(_get(f"/v1/lb/services/{namespace or 'default'}/{name}"))])
    if not rows:
        fail(f"service {ref} not found")
    click.echo(render_rows(rows)) if output == "table" else echo_json(rows)


@click.group("lb")
def lb() -> None:
    """Load-balancer control plane state."""


@lb.group("maglev")
def maglev() -> None:
    """Maglev lookup tables as the lb service computed them."""


@maglev.command("get")
@click.argument("ref")
@OUTPUT_OPTION
def maglev_get(ref: str, output: str) -> None:
    """REF: NAMESPACE/NAME of a Service."""
    namespace, _, name = ref.rpartition("/")
    data = run(_get(f"/v1/lb/maglev/{namespace or 'default'}/{name}"))
    if output == "json":
        echo_json(data)
        return
    for port in data["ports"]:
        label = port["port_name"] or "(unnamed port)"
        if port["table"] is None:
            click.echo(f"{label}: no table (no backend can take new connections)")
            continue
        click.echo(f"{label}: table {port['table']}, M = {port['m']}")
        rows = [[i, port["backends"].get(str(i), ""), port["counts"].get(str(i), 0),
                 f"{100 * port['counts'].get(str(i), 0) / port['m']:.2f}%"]
                for i in port["backend_ids"]]
        click.echo(table(["Backend ID", "Backend", "Slots", "Share"], rows))
        click.echo("First slots: " + " ".join(str(s) for s in port["first"]))
        click.echo("")
