"""``ciliate apply|delete -f FILE`` and ``ciliate get``: any supported kind, routed to its owner.

Every document is validated before any is sent, so a bad file changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ciliate.api.resources import CLUSTER_SCOPE
from ciliate.cli.output import echo_json, fail, run, table
from ciliate.client import ApiError, Client, ClientContext, ContextMissing
from ciliate.resources.base import Resource, ResourceError
from ciliate.resources.loader import load_resources
from ciliate.resources.registry import owner_of, resource_class


def read_files(files: tuple[str, ...]) -> list[Resource]:
    resources: list[Resource] = []
    for name in files:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        try:
            resources.extend(load_resources(data))
        except ResourceError as exc:
            fail(f"{name}: {exc}")
    return resources


def _ref(res: Resource) -> str:
    ns = res.metadata.namespace
    return f"{res.kind.lower()}/{ns + '/' if ns else ''}{res.metadata.name}"


async def apply_resources(resources: list[Resource], dry_run: bool = False,
                          context: ClientContext | None = None) -> list[dict[str, Any]]:
    """Send each resource to its owning service; the first refusal stops the rest."""
    results = []
    async with Client(context or ClientContext.load()) as client:
        for res in resources:
            body = res.model_dump(mode="json", by_alias=True, exclude_none=True)
            params = {"dryRun": "true"} if dry_run else None
            reply = await client.post(owner_of(res.kind), "/v1/resources", body, params=params)
            results.append({"ref": _ref(res), **reply})
    return results


async def _delete(resources: list[Resource]) -> list[str]:
    done = []
    async with Client.from_context() as client:
        for res in resources:
            ns = res.metadata.namespace or ("default" if res.NAMESPACED else CLUSTER_SCOPE)
            path = f"/v1/resources/{res.kind}/{ns}/{res.metadata.name}"
            try:
                await client.delete(owner_of(res.kind), path)
                done.append(f"{_ref(res)} deleted")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                done.append(f"{_ref(res)} not found")
    return done


def _report_api_error(exc: ApiError) -> None:
    body = exc.body if isinstance(exc.body, dict) else {}
    errors = body.get("errors") or []
    detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors) or str(exc)
    fail(f"{exc.status} {detail}")


@click.command("apply")
@click.option("-f", "--filename", "files", multiple=True, required=True,
              help="YAML file (multi-document); '-' reads standard input.")
@click.option("--dry-run", is_flag=True, help="Show what would change; store nothing.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def apply(files: tuple[str, ...], dry_run: bool, output: str) -> None:
    """Create or update the resources in FILE (any supported kind)."""
    resources = read_files(files)
    try:
        results = run(apply_resources(resources, dry_run))
    except ContextMissing as exc:
        fail(str(exc))
        return
    except ApiError as exc:
        _report_api_error(exc)
        return
    if output == "json":
        echo_json(results)
        return
    for item in results:
        if dry_run:
            click.echo(f"{item['ref']} (dry run)")
            for line in item.get("diff", []):
                click.echo(f"  {line}")
        else:
            verb = "created" if item.get("created") else (
                "configured" if item.get("changed") else "unchanged")
            click.echo(f"{item['ref']} {verb}")


@click.command("delete")
@click.option("-f", "--filename", "files", multiple=True, required=True)
def delete(files: tuple[str, ...]) -> None:
    """Delete the resources named in FILE."""
    resources = read_files(files)
    try:
        for line in run(_delete(resources)):
            click.echo(line)
    except ContextMissing as exc:
        fail(str(exc))
    except ApiError as exc:
        _report_api_error(exc)


@click.command("get")
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def get(kind: str, name: str | None, namespace: str | None, output: str) -> None:
    """List objects of KIND (or show one by NAME), read from the owning service."""
    try:
        cls = resource_class(_kind_name(kind))
    except ResourceError as exc:
        fail(str(exc))
        return

    async def fetch() -> Any:
        async with Client.from_context() as client:
            if name:
                ns = (namespace or "default") if cls.NAMESPACED else CLUSTER_SCOPE
                return await client.get(cls.OWNER, f"/v1/resources/{cls.KIND}/{ns}/{name}")
            params = {"namespace": namespace} if namespace else None
            return await client.get(cls.OWNER, f"/v1/resources/{cls.KIND}", params)

    try:
        body = run(fetch())
    except ContextMissing as exc:
        fail(str(exc))
        return
    except ApiError as exc:
        _report_api_error(exc)
        return
    if output == "json":
        echo_json(body)
        return
    items = body.get("items", [body]) if isinstance(body, dict) else []
    rows = [[i["metadata"].get("namespace", ""), i["metadata"]["name"],
             i["metadata"].get("generation", "")] for i in items]
    click.echo(table(["NAMESPACE", "NAME", "GENERATION"], rows))


def _kind_name(text: str) -> str:
    """Accept ``pods``, ``pod``, ``Pod``, ``cnp`` as kubectl does for the common kinds."""
    from ciliate.resources.registry import KINDS

    aliases = {"cnp": "CiliumNetworkPolicy", "ccnp": "CiliumClusterwideNetworkPolicy",
               "netpol": "NetworkPolicy", "ns": "Namespace", "svc": "Service",
               "tp": "TracingPolicy", "tpn": "TracingPolicyNamespaced",
               "eps": "EndpointSlice", "endpointslices": "EndpointSlice"}
    low = text.lower()
    if low in aliases:
        return aliases[low]
    for kind in KINDS:
        if low in (kind.lower(), kind.lower() + "s", kind.lower() + "es"):
            return kind
    return text
