"""Wires the Kubernetes sync: one reflector per watched kind feeding the owning services over
REST, CiliumEndpoint and policy status written back to the API server.

Settings (``Settings.extra`` first, then the environment):
  ``kubeconfig`` / ``KUBECONFIG``          kubeconfig file; absent: in-cluster service account
  ``kube_context`` / ``CILIATE_KUBE_CONTEXT``
  ``services`` / ``CILIATE_SERVICE_URLS``  ``identity=http://identity:8080,policy=...``; absent:
                                           the client context file of the embedded stack
  ``kinds`` / ``CILIATE_K8S_KINDS``        comma-separated subset of the watched kinds
  ``watch_timeout`` / ``CILIATE_K8S_WATCH_TIMEOUT``  seconds per watch request (default 300)
Run one replica: every replica would apply the same objects (harmless, but twice the work).
"""

from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from ciliate.api import READINESS_KEY, route
from ciliate.bus import Bucket, KVMirror
from ciliate.client import Client, ClientContext
from ciliate.runner import ServiceContext, ServiceSpec
from services.k8ssync.core.kinds import BY_KIND, WATCHED, ApiKind
from services.k8ssync.endpoints import EndpointWriter
from services.k8ssync.kubeapi import KubeClient, load_access
from services.k8ssync.sync import STATUS_OWNED_KINDS, OwnerSink, PolicyStatusWriter, Reflector


def _setting(ctx: ServiceContext, key: str, env: str, default: str = "") -> str:
    return ctx.settings.extra.get(key) or os.environ.get(env) or default


def parse_service_urls(raw: str) -> dict[str, list[str]]:
    """``identity=http://a:1,identity=http://b:1,policy=http://c:1`` -> {service: [urls]}."""
    out: dict[str, list[str]] = {}
    for part in raw.split(","):
        name, sep, url = part.strip().partition("=")
        if not sep or not name or not url:
            raise ValueError(f"service URL {part!r} is not NAME=URL")
        out.setdefault(name, []).append(url.rstrip("/"))
    return out


def client_context(ctx: ServiceContext) -> ClientContext:
    raw = _setting(ctx, "services", "CILIATE_SERVICE_URLS")
    if raw:
        return ClientContext(state_dir=str(ctx.settings.state_dir), nats_url=ctx.settings.nats_url,
                             token=ctx.settings.token, services=parse_service_urls(raw))
    return ClientContext.load(ctx.settings.state_dir)


def watched_kinds(raw: str) -> tuple[ApiKind, ...]:
    if not raw:
        return WATCHED
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_KIND or BY_KIND[n] not in WATCHED]
    if unknown:
        raise ValueError(f"not watchable: {', '.join(unknown)}; "
                         f"choose from {', '.join(k.kind for k in WATCHED)}")
    return tuple(k for k in WATCHED if k.kind in names)


async def setup(ctx: ServiceContext) -> None:
    access = load_access(_setting(ctx, "kubeconfig", "KUBECONFIG") or None,
                         _setting(ctx, "kube_context", "CILIATE_KUBE_CONTEXT") or None)
    kube = KubeClient(access)
    client = Client(client_context(ctx))
    kinds = watched_kinds(_setting(ctx, "kinds", "CILIATE_K8S_KINDS"))
    timeout = int(_setting(ctx, "watch_timeout", "CILIATE_K8S_WATCH_TIMEOUT", "300"))
    endpoints = EndpointWriter(kube)
    policy_status = PolicyStatusWriter(kube)
    reflectors = [
        Reflector(kind, kube, OwnerSink(client), watch_timeout=timeout,
                  status_writer=policy_status if kind.kind in STATUS_OWNED_KINDS else None,
                  observers=[endpoints.observe] if kind.kind == "Pod" else [])
        for kind in kinds
    ]
    for reflector in reflectors:
        ctx.spawn(reflector.run(), name=f"watch-{reflector.kind.plural}")
    if any(k.kind == "Pod" for k in kinds):
        mirror = KVMirror(await ctx.bus.kv(Bucket.ENDPOINTS), endpoints.on_endpoint)
        ctx.spawn(endpoints.run(mirror), name="ciliumendpoints")

    def status() -> dict[str, Any]:
        return {"server": access.server,
                "kinds": {r.kind.kind: r.stats.as_dict() for r in reflectors},
                "ciliumEndpoints": {"written": endpoints.written, "errors": endpoints.errors}}

    async def show(_request: web.Request) -> web.Response:
        return web.json_response(status())

    async def synced() -> bool:
        return all(r.stats.synced for r in reflectors)

    ctx.app[READINESS_KEY]["kubernetes"] = synced
    route(ctx.app, "GET", "/v1/k8s/status", show,
          summary="per kind: resourceVersion, lists, 410 relists, events, bookmarks, refusals")
    ctx.status["k8s"] = {"server": access.server, "kinds": [k.kind for k in kinds]}

    async def close() -> None:
        await client.close()
        await kube.close()

    ctx.on_shutdown(close)


SPEC = ServiceSpec(name="k8s-sync", setup=setup, uses_db=False)
