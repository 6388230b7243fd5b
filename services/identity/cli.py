"""``ciliate identity list|get``, ``ciliate endpoint list``, ``ciliate ip list``: as cilium-dbg
prints them, or ``-o json`` in the shapes DESIGN.md fixes."""

from __future__ import annotations

from typing import Any

import click

from ciliate.cli.output import OUTPUT_OPTION, echo_json, run, table
from ciliate.client import Client


async def _get(path: str) -> Any:
    async with Client.from_context() as client:
        return await client.get("identity", path)


def _identity_rows(items: list[dict[str, Any]]) -> str:
    rows = []
    for item in items:
        labels = item["labels"] or [""]
        rows.append([item["id"], labels[0]])
        rows += [["", label] for label in labels[1:]]
    return table(["ID", "LABELS"], rows)


@click.group("identity")
def identity() -> None:
    """Security identities (reserved ones included)."""


@identity.command("list")
@OUTPUT_OPTION
def identity_list(output: str) -> None:
    items = run(_get("/v1/identities"))
    shaped = [{"id": i["id"], "labels": i["labels"]} for i in items]
    click.echo(_identity_rows(shaped)) if output == "table" else echo_json(shaped)


@identity.command("get")
@click.argument("ident", type=int)
@OUTPUT_OPTION
def identity_get(ident: int, output: str) -> None:
    item = run(_get(f"/v1/identities/{ident}"))
    shaped = [{"id": item["id"], "labels": item["labels"]}]
    click.echo(_identity_rows(shaped)) if output == "table" else echo_json(shaped)


@click.group("endpoint")
def endpoint() -> None:
    """Endpoints (pods) with their identity, addresses and node."""


@endpoint.command("list")
@OUTPUT_OPTION
def endpoint_list(output: str) -> None:
    items = run(_get("/v1/endpoints"))
    if output == "json":
        echo_json(items)
        return
    rows = [
        [
            e["id"],
            e["identity"],
            f"{e['namespace']}/{e['name']}",
            ",".join(e["ips"]),
            e["node"],
            "ready" if e["ready"] else "not-ready",
        ]
        for e in items
    ]
    click.echo(table(["ENDPOINT", "IDENTITY", "POD", "IPv4", "NODE", "STATUS"], rows))


@click.group("ip")
def ip() -> None:
    """The ipcache: IP prefix -> identity."""


@ip.command("list")
@OUTPUT_OPTION
def ip_list(output: str) -> None:
    items = run(_get("/v1/ipcache"))
    if output == "json":
        echo_json(items)
        return
    click.echo(
        table(
            ["IP", "IDENTITY", "SOURCE"], [[i["prefix"], i["identity"], i["node"]] for i in items]
        )
    )
