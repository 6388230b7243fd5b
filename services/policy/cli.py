"""``ciliate policy matrix|trace``: offline, through the same compile and lookup as the datapath."""

from __future__ import annotations

import json
from pathlib import Path

import click

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
