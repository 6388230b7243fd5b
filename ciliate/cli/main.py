"""``ciliate``: the entry point. Core commands are defined here; services add theirs as plugins."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ciliate import __version__
from ciliate.cli.output import run
from ciliate.cli.plugins import add_plugin_commands, service_specs
from ciliate.cli.resources import apply, apply_resources, delete, get, read_files
from ciliate.cli.status import status
from ciliate.client import ApiError, ClientContext
from ciliate.config import state_dir_from_env
from ciliate.doctor.cli import doctor


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ciliate")
def cli() -> None:
    """Ciliate: identity-based network policy, load balancing, flow observability and runtime
    enforcement on eBPF."""


def _replicas(values: tuple[str, ...]) -> dict[str, int]:
    result = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not count.isdigit() or int(count) < 1:
            raise click.BadParameter(f"{value!r}: expected SERVICE=N with N >= 1",
                                     param_hint="--replicas")
        result[name] = int(count)
    return result


@cli.command("up")
@click.option("--nodes", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Nodes of the dev cluster (one datapath and security agent each).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where everything is kept (default ~/.local/state/ciliate).")
@click.option("--replicas", multiple=True, help="SERVICE=N, e.g. identity=3 (repeatable).")
@click.option("--no-agents", is_flag=True, help="Do not start the per-node agents.")
@click.option("--db-url", default=None, help="Use this database instead of SQLite.")
@click.option("--nats-auth/--no-nats-auth", default=True, show_default=True,
              help="One NATS user per service with the permissions of infra/nats.")
@click.option("--ready-timeout", type=float, default=60.0, show_default=True)
@click.option("--example", "examples", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Apply this YAML file once the stack is ready (repeatable).")
def up(nodes: int, state_dir: Path | None, replicas: tuple[str, ...], no_agents: bool,
       db_url: str | None, nats_auth: bool, ready_timeout: float,
       examples: tuple[str, ...]) -> None:
    """Run the whole stack on this machine, in the foreground, until Ctrl-C."""
    from ciliate.bus.subjects import SERVICES
    from ciliate.stack.supervisor import Stack, StackConfig, run_foreground

    counts = _replicas(replicas)
    unknown = sorted(set(counts) - set(SERVICES))
    if unknown:
        raise click.BadParameter(f"unknown service(s) {unknown}; known: {list(SERVICES)}",
                                 param_hint="--replicas")
    config = StackConfig(state_dir=(state_dir or state_dir_from_env()).absolute(), nodes=nodes,
                         replicas=counts, agents=not no_agents, db_url=db_url,
                         nats_auth=nats_auth)
    scene = read_files(examples) if examples else []

    def apply_examples(context: ClientContext) -> None:
        try:
            for item in run(apply_resources(scene, context=context)):
                click.echo(f"  applied {item['ref']}")
        except ApiError as exc:
            click.echo(f"  example not applied: {exc}", err=True)
        if scene:
            click.echo("  the example scene is applied: try `ciliate endpoint list`, "
                       "`ciliate pod exec default/tiefighter -- ...`, `ciliate observe`")

    def say(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    sys.exit(run_foreground(Stack(config), say, ready_timeout, apply_examples))


@cli.command("run", context_settings={"ignore_unknown_options": True,
                                      "allow_interspersed_args": False})
@click.argument("service")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(service: str, args: tuple[str, ...]) -> None:
    """Run one service in the foreground (flags: --nats-url, --db-url, --node, ...)."""
    specs = service_specs()
    if service not in specs:
        raise click.BadParameter(f"{service!r}; known: {sorted(specs)}", param_hint="SERVICE")
    from ciliate.runner import main as run_main

    run_main(specs[service].load(), list(args))


@cli.group("db")
def db() -> None:
    """The desired-state database."""


@db.command("upgrade")
@click.option("--db-url", default=None, help="Database URL (default: CILIATE_DB_URL or the "
              "state dir's SQLite file).")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(db_url: str | None, revision: str) -> None:
    """Apply the migrations up to REVISION."""
    from ciliate.config import Settings
    from ciliate.store.migrate import upgrade

    url = db_url or Settings.from_env().db_url
    if url.startswith("sqlite"):
        state_dir_from_env().mkdir(parents=True, exist_ok=True)
    upgrade(url, revision)
    click.echo(f"database at {revision}")


for command in (apply, delete, get, status, doctor):
    cli.add_command(command)

_BROKEN = add_plugin_commands(cli)


def main() -> None:
    if _BROKEN and os.environ.get("CILIATE_DEBUG"):
        for line in _BROKEN:
            click.echo(f"warning: plugin not loaded: {line}", err=True)
    cli(prog_name="ciliate")


if __name__ == "__main__":
    main()
