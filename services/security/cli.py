"""Click commands the security service contributes to `ciliate`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import yaml

from ciliate.cli.output import echo_json, run, table
from ciliate.client import ApiError, Client
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


SERVICE = "security"
KINDS = ("TracingPolicy", "TracingPolicyNamespaced")


def _api_failure(exc: ApiError) -> None:
    body = exc.body if isinstance(exc.body, dict) else {}
    errors = body.get("errors") or []
    for err in errors:
        click.echo(f"{err.get('field')}: {err.get('message')}", err=True)
    if not errors:
        click.echo(f"Error: {exc}", err=True)
    raise SystemExit(1)


@tracingpolicy.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def add(path: Path) -> None:
    """Store the policies in FILE; every node's agent loads them."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]

    async def send() -> list[Any]:
        async with Client.from_context() as client:
            return [await client.post(SERVICE, "/v1/resources", doc) for doc in docs]

    try:
        results = run(send())
    except ApiError as exc:
        _api_failure(exc)
        return
    for result in results:
        obj = result["object"]
        verb = "created" if result.get("created") else (
            "configured" if result.get("changed") else "unchanged")
        click.echo(f"{obj['kind']} {_display_name(obj)} {verb}")


def _display_name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def _hooks(obj: Mapping[str, Any]) -> str:
    spec = obj.get("spec") or {}
    return ",".join(f"{kind}:{len(spec[kind])}" for kind in
                    ("tracepoints", "kprobes", "lsmhooks") if spec.get(kind))


@tracingpolicy.command("list")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def list_(output: str) -> None:
    """Stored policies (both kinds)."""

    async def fetch() -> list[dict[str, Any]]:
        async with Client.from_context() as client:
            items: list[dict[str, Any]] = []
            for kind in KINDS:
                items += (await client.get(SERVICE, f"/v1/resources/{kind}"))["items"]
            return items

    try:
        items = run(fetch())
    except ApiError as exc:
        _api_failure(exc)
        return
    if output == "json":
        echo_json(items)
        return
    rows = [[(i.get("metadata") or {}).get("name", ""),
             (i.get("metadata") or {}).get("namespace", "") or "(cluster)",
             i.get("kind", ""), _hooks(i)] for i in items]
    click.echo(table(["NAME", "NAMESPACE", "KIND", "HOOKS"], rows))


@tracingpolicy.command("delete")
@click.argument("name")
@click.option("-n", "--namespace", default="",
              help="Delete the TracingPolicyNamespaced NAME in this namespace.")
def delete(name: str, namespace: str) -> None:
    """Delete a policy; every agent unloads it."""
    kind, ns = ("TracingPolicyNamespaced", namespace) if namespace else ("TracingPolicy", "_")

    async def send() -> Any:
        async with Client.from_context() as client:
            return await client.delete(SERVICE, f"/v1/resources/{kind}/{ns}/{name}")

    try:
        run(send())
    except ApiError as exc:
        _api_failure(exc)
        return
    click.echo(f"{kind} {namespace + '/' if namespace else ''}{name} deleted")
