"""``ciliate policy matrix|trace`` (offline, through the same compile and lookup as the datapath),
``ciliate policy get`` and ``ciliate bpf policy get`` (the running stack)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ciliate.bus import Bucket
from ciliate.cli.output import echo_json, fail, run, table
from ciliate.client import ApiError, Client, ContextMissing, connect_bus
from ciliate.policymap import Entry, iter_entries, readable
from ciliate.resources.base import Resource, ResourceError
from ciliate.resources.ciliumpolicy import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy
from ciliate.resources.loader import load_resources
from ciliate.resources.networkpolicy import NetworkPolicy
from services.policy.core.spec import PROTOCOL_NUMBERS
from services.policy.core.world import PolicyResource, build_world, compile_world, matrix, trace


def _load(paths: tuple[str, ...]) -> list[Resource]:
    out: list[Resource] = []
    for path in paths:
        try:
            out += load_resources(Path(path).read_bytes())
        except ResourceError as exc:
            raise click.ClickException(f"{path}: {exc}") from None
    return out


def _policies(resources: list[Resource]) -> list[PolicyResource]:
    kinds = (NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)
    return [r for r in resources if isinstance(r, kinds)]


def _proto(name: str) -> int:
    number = PROTOCOL_NUMBERS.get(name.upper())
    if number is None or number == 0:
        raise click.BadParameter(f"unknown protocol {name!r}", param_hint="--protocol")
    return number


@click.group("policy")
def policy() -> None:
    """Network policy: offline reachability and traces."""


@policy.command("matrix")
@click.option("--world", "world_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-f", "--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--port", type=click.IntRange(0, 65535), required=True)
@click.option("--protocol", default="TCP", show_default=True)
@click.option("-o", "--output", type=click.Choice(["json", "table"]), default="table")
def matrix_cmd(
    world_file: str, files: tuple[str, ...], port: int, protocol: str, output: str
) -> None:
    """Which pod may reach which on PORT/PROTOCOL (self pairs omitted)."""
    world_resources = _load((world_file,))
    world = build_world(world_resources)
    _, result = compile_world(world, _policies(world_resources + _load(files)))
    for overflow in result.overflows:
        click.echo(f"error: {overflow}", err=True)
    grid = matrix(result, world, _proto(protocol), port)
    if output == "json":
        click.echo(json.dumps(grid, indent=1, sort_keys=True))
        return
    names = sorted(grid)
    click.echo("src\\dst " + " ".join(f"{n:>6}" for n in names))
    for src in names:
        cells = ["     ." if d == src else ("     ✓" if grid[src][d] else "     ✗") for d in names]
        click.echo(f"{src:>7} " + " ".join(cells))


@policy.command("trace")
@click.option("--world", "world_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-f", "--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--src", required=True, help="NS/POD")
@click.option("--dst", required=True, help="NS/POD")
@click.option("--dport", required=True, help="PORT/PROTO, e.g. 80/TCP")
@click.option("-o", "--output", type=click.Choice(["json", "text"]), default="text")
def trace_cmd(
    world_file: str, files: tuple[str, ...], src: str, dst: str, dport: str, output: str
) -> None:
    """The verdict for one connection and the rules that decided it."""
    world_resources = _load((world_file,))
    world = build_world(world_resources)
    for name, value in (("--src", src), ("--dst", dst)):
        if value not in world.pods:
            raise click.BadParameter(f"no pod {value!r} in the world", param_hint=name)
    port_text, _, proto_text = dport.partition("/")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise click.BadParameter(f"{dport!r} is not PORT/PROTO", param_hint="--dport")
    _, result = compile_world(world, _policies(world_resources + _load(files)))
    t = trace(result, world, src, dst, _proto(proto_text or "TCP"), int(port_text))
    if output == "json":
        click.echo(json.dumps(t.as_dict(), indent=1))
        return
    d = t.as_dict()
    click.echo(f"{src} -> {dst} {dport}: {str(d['verdict']).upper()}")
    for side in ("egress", "ingress"):
        info = d[side]
        assert isinstance(info, dict)
        rules = ", ".join(info["rules"]) or "-"
        click.echo(f"  {side:<8} {info['verdict']:<15} entry={info['entry']} rules: {rules}")


# --- against the running stack ------------------------------------------------------------

POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


async def _stored_policies() -> list[dict[str, Any]]:
    async with Client.from_context() as client:
        items: list[dict[str, Any]] = []
        for kind in POLICY_KINDS:
            body = await client.get("policy", f"/v1/resources/{kind}")
            items += body.get("items", [])
        return items


@policy.command("get")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def get_cmd(output: str) -> None:
    """The stored policies (NetworkPolicy, CNP, CCNP), from the policy service."""
    try:
        items = run(_stored_policies())
    except (ContextMissing, ApiError) as exc:
        fail(str(exc))
        return
    if output == "json":
        echo_json(items)
        return
    rows = [[i["kind"], i["metadata"].get("namespace", ""), i["metadata"]["name"],
             i["metadata"].get("generation", "")] for i in items]
    click.echo(table(["KIND", "NAMESPACE", "NAME", "GENERATION"], rows))


BPF_HEADERS = ["POLICY", "DIRECTION", "LABELS (source:key[=value])", "PORT/PROTO", "PROXY PORT",
               "AUTH TYPE", "BYTES", "PACKETS", "PREFIX"]
PROTO_NAMES = {v: k for k, v in PROTOCOL_NUMBERS.items() if v}


def port_text(entry: Entry) -> str:
    """``ANY``, ``80/TCP``, ``ANY/UDP`` or a range block ``1024-1535/TCP``."""
    if entry.proto == 0:
        return "ANY"
    name = PROTO_NAMES.get(entry.proto, str(entry.proto))
    plen, port = entry.prefixlen, entry.port
    if plen == 0:
        return f"ANY/{name}"
    if plen == 16:
        return f"{port}/{name}"
    return f"{port}-{port + (1 << (16 - plen)) - 1}/{name}"


def bpf_rows(value: dict[str, Any], labels: dict[int, list[str]]) -> list[list[str]]:
    """One row per entry (extra label lines below it), as ``cilium-dbg bpf policy get``."""
    rows: list[list[str]] = []
    for e in iter_entries(value):
        names = ["ANY"] if e.peer == 0 else (labels.get(e.peer) or [f"identity {e.peer}"])
        prefix = 0 if e.proto == 0 else 8 + e.prefixlen
        rows.append(["Deny" if e.deny else "Allow", e.direction.capitalize(), names[0],
                     port_text(e), str(e.proxy_port or "NONE"), "disabled", "0", "0",
                     str(prefix)])
        rows += [["", "", extra, "", "", "", "", "", ""] for extra in names[1:]]
    return rows


async def _bpf_policy(target: str) -> tuple[dict[str, Any], dict[int, list[str]]]:
    bus = await connect_bus(name="ciliate-cli-policy")
    try:
        ident_text = target
        if "/" in target:
            ns, _, name = target.partition("/")
            ep = await (await bus.kv(Bucket.ENDPOINTS)).get(f"{ns}.{name}")
            if ep is None:
                raise click.ClickException(f"no endpoint {target}")
            ident_text = str(ep.value["identity"])
        if not ident_text.isdigit():
            raise click.BadParameter(f"{target!r} is neither an identity nor NS/POD")
        entry = await (await bus.kv(Bucket.POLICY)).get(ident_text)
        if entry is None:
            raise click.ClickException(f"no policy published for identity {ident_text}")
        identities = await (await bus.kv(Bucket.IDENTITIES)).items()
        labels = {int(v["id"]): list(v["labels"]) for v in identities.values()
                  if isinstance(v, dict) and isinstance(v.get("id"), int)}
        return dict(entry.value), labels
    finally:
        await bus.close()


@policy.command("entries")
@click.argument("target")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def policy_entries(target: str, output: str) -> None:
    """Compiled entries for IDENTITY or NS/POD, as published in KV ``policy``, in
    `cilium-dbg bpf policy get` columns (`ciliate bpf policy get` shows the maps as loaded)."""
    try:
        value, labels = run(_bpf_policy(target))
    except ContextMissing as exc:
        fail(str(exc))
        return
    if output == "json":
        echo_json(readable(value))  # entries as a list of dicts, not the packed bytes
        return
    if value.get("overflow"):
        click.echo(f"Error: policy refused: {value['overflow']['entries']} entries exceed the "
                   f"map capacity {value['overflow']['capacity']}", err=True)
    click.echo(table(BPF_HEADERS, bpf_rows(value, labels)))
