"""Click commands the security service contributes to `ciliate`."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from ciliate.resources.base import ResourceError

ENFORCEMENT_FEATURES = ("tracepoint", "ringbuf", "send_signal", "btf", "kprobe", "lsm",
                        "override_return")


@click.command("probe")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def probe(output: str) -> None:
    """Kernel features runtime enforcement depends on (what policies this host can run)."""
    from ciliate.doctor.probes import kernel_features

    features = kernel_features()
    rows = {name: features.has(name) for name in ENFORCEMENT_FEATURES}
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for name, ok in rows.items():
        detail = "" if ok else f"  ({features.reason(name)})"
        click.echo(f"{name:<16} {'yes' if ok else 'no'}{detail}")


@click.group("tracingpolicy")
def tracingpolicy() -> None:
    """TracingPolicy tools (Tetragon's `tetra tracingpolicy`)."""


@tracingpolicy.command("validate")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(path: Path) -> None:
    """Validate a policy file against this kernel's tracepoints, without loading it."""
    from services.security.core.spec import parse_resource
    from services.security.loader import tracepoint_format

    failed = False
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        try:
            spec = parse_resource(doc, tracepoint_format)
        except ResourceError as exc:
            failed = True
            for err in exc.errors:
                click.echo(f"{err.path}: {err.message}", err=True)
            continue
        click.echo(f"{spec.name}: ok, needs {', '.join(spec.required_features)}")
    if failed:
        raise SystemExit(1)
