"""Generic REST for the kinds a service owns: validate at the edge, store in one transaction.

``POST /v1/resources`` applies one document (``?dryRun=true`` stores nothing), ``GET`` lists
or reads, ``DELETE`` removes. The service plugs in hooks that run inside the same unit of work
(derive state, refuse conflicts) and after the commit (publish to KV), so a failure anywhere
leaves nothing half-applied.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy.exc import IntegrityError

from ciliate.api.app import read_object
from ciliate.api.openapi import route
from ciliate.api.problems import Problem, field_problem
from ciliate.resources.base import Resource
from ciliate.resources.registry import KINDS, parse_resource
from ciliate.store import Database, DatabaseUnavailable, ResourceRepository, StoredResource
from ciliate.store.database import UnitOfWork

CLUSTER_SCOPE = "_"
"""Namespace placeholder in paths for cluster-scoped objects."""

ApplyHook = Callable[[UnitOfWork, Resource, StoredResource | None, bool], Awaitable[dict[str, Any]]]
DeleteHook = Callable[[UnitOfWork, StoredResource], Awaitable[dict[str, Any]]]
AfterCommit = Callable[[], Awaitable[None]]


async def _no_apply(
    _uow: UnitOfWork, _res: Resource, _old: StoredResource | None, _dry: bool
) -> dict[str, Any]:
    return {}


async def _no_delete(_uow: UnitOfWork, _stored: StoredResource) -> dict[str, Any]:
    return {}


async def _nothing() -> None:
    return None


@dataclass
class ResourceHandlers:
    """How one service stores its kinds. Hooks run inside the transaction; ``after_commit``
    runs once the change is durable (publishing derived state)."""

    db: Database
    kinds: frozenset[str]
    on_apply: ApplyHook = _no_apply
    on_delete: DeleteHook = _no_delete
    after_commit: AfterCommit = _nothing

    def _kind(self, kind: str) -> str:
        if kind not in self.kinds:
            owned = ", ".join(sorted(self.kinds))
            raise field_problem(404, "kind", f"{kind!r} is not served here (this service: {owned})")
        return kind

    async def apply(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        dry_run = request.query.get("dryRun", "").lower() in ("1", "true", "all")
        resource = parse_resource(body)
        self._kind(resource.kind)
        namespace = resource.metadata.namespace or ""
        if resource.NAMESPACED and not namespace:
            namespace = "default"
            resource.metadata.namespace = namespace
        if not resource.NAMESPACED:
            resource.metadata.namespace = None
            namespace = ""
        try:
            async with self.db.unit_of_work() as uow:
                repo = ResourceRepository(uow.session)
                old = await repo.get(resource.kind, namespace, resource.metadata.name)
                extra = await self.on_apply(uow, resource, old, dry_run)
                # After the hook: it may fill in what the service allocates (a clusterIP...).
                doc = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
                if dry_run:
                    return web.json_response({"dryRun": True, "object": doc, **extra})
                result = await repo.apply(doc, existing=old)
                await uow.commit()
        except IntegrityError as exc:
            raise Problem(409, f"conflict: {exc.orig}") from None
        except DatabaseUnavailable as exc:
            raise Problem(503, f"database unavailable: {exc}") from None
        if result.changed:
            await self.after_commit()
        status = 201 if result.created else 200
        return web.json_response(
            {"object": result.resource.to_document(), "created": result.created,
             "changed": result.changed, **extra},
            status=status,
        )

    async def list(self, request: web.Request) -> web.Response:
        kind = self._kind(request.match_info["kind"])
        namespace = request.query.get("namespace")
        try:
            async with self.db.unit_of_work() as uow:
                items = await ResourceRepository(uow.session).list(kind, namespace)
        except DatabaseUnavailable as exc:
            raise Problem(503, f"database unavailable: {exc}") from None
        return web.json_response({"kind": f"{kind}List",
                                  "items": [i.to_document() for i in items]})

    def _ref(self, request: web.Request) -> tuple[str, str, str]:
        kind = self._kind(request.match_info["kind"])
        namespace = request.match_info["namespace"]
        namespace = "" if namespace == CLUSTER_SCOPE else namespace
        return kind, namespace, request.match_info["name"]

    async def get(self, request: web.Request) -> web.Response:
        kind, namespace, name = self._ref(request)
        try:
            async with self.db.unit_of_work() as uow:
                item = await ResourceRepository(uow.session).get(kind, namespace, name)
        except DatabaseUnavailable as exc:
            raise Problem(503, f"database unavailable: {exc}") from None
        if item is None:
            raise field_problem(404, "metadata.name", f"{kind} {namespace}/{name} not found")
        return web.json_response(item.to_document())

    async def delete(self, request: web.Request) -> web.Response:
        kind, namespace, name = self._ref(request)
        try:
            async with self.db.unit_of_work() as uow:
                repo = ResourceRepository(uow.session)
                item = await repo.get(kind, namespace, name)
                if item is None:
                    raise field_problem(404, "metadata.name", f"{kind} {namespace}/{name} absent")
                extra = await self.on_delete(uow, item)
                await repo.delete(kind, namespace, name)
                await uow.commit()
        except DatabaseUnavailable as exc:
            raise Problem(503, f"database unavailable: {exc}") from None
        await self.after_commit()
        return web.json_response({"deleted": item.to_document(), **extra})

    def register(self, app: web.Application) -> None:
        kinds = sorted(self.kinds)
        schema = {"type": "object", "required": ["apiVersion", "kind", "metadata"],
                  "properties": {"apiVersion": {"type": "string"},
                                 "kind": {"type": "string", "enum": kinds},
                                 "metadata": {"type": "object"}}}
        route(app, "POST", "/v1/resources", self.apply, summary=f"apply one of {kinds}",
              request_schema=schema, query=("dryRun",))
        route(app, "GET", "/v1/resources/{kind}", self.list, summary="list objects of a kind",
              query=("namespace",))
        route(app, "GET", "/v1/resources/{kind}/{namespace}/{name}", self.get,
              summary="read one object (namespace '_' for cluster-scoped kinds)")
        route(app, "DELETE", "/v1/resources/{kind}/{namespace}/{name}", self.delete,
              summary="delete one object")


def owned_kinds(service: str) -> frozenset[str]:
    return frozenset(k for k, cls in KINDS.items() if service == cls.OWNER)
