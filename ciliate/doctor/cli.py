"""`ciliate doctor [--fix] [-o json]`: is this host ready for the datapath and security services?"""

from __future__ import annotations

import json

import click

from ciliate.doctor.checks import healthy, run_checks
from ciliate.doctor.probes import kernel_features

_MARK = {True: "ok", False: "FAIL"}


@click.command("doctor")
@click.option("--fix", "apply_fix", is_flag=True, help="Repair what can be repaired (idempotent).")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format.",
)
def doctor(apply_fix: bool, output: str) -> None:
    """Check (and with --fix, prepare) the host: bcc, headers, mounts, BTF, BPF features.

    Exits 1 when a required check fails.
    """
    results = run_checks(apply_fix=apply_fix)
    ok = healthy(results)
    if output == "json":
        report = {
            "ok": ok,
            "checks": [result.to_dict() for result in results],
            "kernel": kernel_features().to_dict(),
        }
        click.echo(json.dumps(report, indent=2, sort_keys=False))
    else:
        width = max(len(result.name) for result in results)
        for result in results:
            mark = _MARK[result.ok] if result.required or result.ok else "warn"
            click.echo(f"{mark:>4}  {result.name:<{width}}  {result.detail}")
            if result.fixed:
                click.echo(f"{'':>4}  {'':<{width}}  fix: {result.fixed}")
        click.echo("host ready" if ok else "host NOT ready: run `ciliate doctor --fix` as root")
    if not ok:
        raise SystemExit(1)
