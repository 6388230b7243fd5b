"""Generic REST for the kinds a service owns: validate at the edge, store in one transaction.

``POST /v1/resources`` applies one document (``?dryRun=true`` stores nothing), ``GET`` lists
or reads, ``DELETE`` removes. The service plugs in hooks that run inside the same unit of work
(derive state, refuse conflicts) and after the commit (publish to KV), so a failure anywhere
leaves nothing half-applied.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
from ciliate.store.resources import ApplyResult

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
    group_commit: int = 0
    """Above 1: applies arriving while a transaction is open share the next one, up to this
    many per transaction (see :class:`GroupCommit`); the hooks must then keep what they
    collect for ``after_commit`` in a context variable, as each transaction runs in a task of
    its own context."""
    _group: GroupCommit | None = field(default=None, init=False, repr=False)

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
        if resource.NAMESPACED and not resource.metadata.namespace:
            resource.metadata.namespace = "default"
        if not resource.NAMESPACED:
            resource.metadata.namespace = None
        if dry_run:
            try:
                async with self.db.unit_of_work() as uow:
                    old = await ResourceRepository(uow.session).get(
                        resource.kind, resource.metadata.namespace or "", resource.metadata.name
                    )
                    extra = await self.on_apply(uow, resource, old, True)
            except DatabaseUnavailable as exc:
                raise Problem(503, f"database unavailable: {exc}") from None
            doc = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
            return web.json_response({"dryRun": True, "object": doc, **extra})
        if self.group_commit > 1:
            if self._group is None:
                self._group = GroupCommit(self, self.group_commit)
            result, extra = await self._group.submit(resource)
        else:
            result, extra = await self.apply_alone(resource)
        status = 201 if result.created else 200
        return web.json_response(
            {"object": result.resource.to_document(), "created": result.created,
             "changed": result.changed, **extra},
            status=status,
        )

    async def _apply_in(
        self, uow: UnitOfWork, resource: Resource
    ) -> tuple[ApplyResult, dict[str, Any]]:
        repo = ResourceRepository(uow.session)
        old = await repo.get(
            resource.kind, resource.metadata.namespace or "", resource.metadata.name
        )
        extra = await self.on_apply(uow, resource, old, False)
        # After the hook: it may fill in what the service allocates (a clusterIP...).
        doc = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
        return await repo.apply(doc, existing=old), extra

    async def apply_alone(self, resource: Resource) -> tuple[ApplyResult, dict[str, Any]]:
        """Apply one object in its own transaction, then run ``after_commit`` if it changed.

        An apply that loses a race to create the same object (both read "absent", the other
        inserted first) runs once more and updates it, as an apply is idempotent. Each attempt
        runs on a copy of the object (hooks fill in what they allocate) in a task with a copy
        of this context, so what the hooks collected in a rolled-back attempt is dropped.
        """
        base = contextvars.copy_context()
        for attempt in (1, 2):
            try:
                return await asyncio.create_task(
                    self._attempt(resource.model_copy(deep=True)), context=base.copy()
                )
            except IntegrityError as exc:
                if attempt == 2:
                    raise Problem(409, f"conflict: {exc.orig}") from None
            except DatabaseUnavailable as exc:
                raise Problem(503, f"database unavailable: {exc}") from None
        raise AssertionError("unreachable")

    async def _attempt(self, resource: Resource) -> tuple[ApplyResult, dict[str, Any]]:
        async with self.db.unit_of_work() as uow:
            result, extra = await self._apply_in(uow, resource)
            await uow.commit()
        if result.changed:
            await self.after_commit()
        return result, extra

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


Applied = tuple[ApplyResult, dict[str, Any]]


@dataclass
class _Job:
    resource: Resource
    done: asyncio.Future[Applied]


class GroupCommit:
    """Group commit for applies: one transaction (and one commit, one ``after_commit``) for the
    applies that queued while the previous transactions were open.

    At most ``workers`` transactions are open at once; each takes up to ``size`` queued applies,
    ordered by kind, namespace and labels so that concurrent transactions take row locks keyed
    by labels (identity references) in the same order. Each apply runs exactly as it would
    alone, in sequence inside the shared transaction. If any of them fails, the whole
    transaction rolls back and every apply of it runs again alone (from the object as it
    arrived, not as the hooks filled it in), so one refused apply never takes the others with
    it and nothing is half-applied. A transaction runs in a task with a
    copy of the context the group was created in, so what hooks collect in context variables
    for ``after_commit`` is the transaction's own and is dropped with a rollback.
    """

    def __init__(self, handlers: ResourceHandlers, size: int, workers: int = 3) -> None:
        self.handlers = handlers
        self.size = size
        self.workers = workers
        self.queue: list[_Job] = []
        self.running: set[asyncio.Task[None]] = set()
        self.context = contextvars.copy_context()
        self.batches = 0
        self.fallbacks = 0

    async def submit(self, resource: Resource) -> Applied:
        job = _Job(resource, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        if len(self.running) < self.workers:
            task = asyncio.create_task(self._drain(), context=self.context.copy())
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        return await asyncio.shield(job.done)

    async def _drain(self) -> None:
        try:
            while self.queue:
                await self._one_group()
        finally:
            # Leave the running set in the same step that saw the queue empty: a done callback
            # runs later, and an apply queued in between would find every worker "running" and
            # none left to take it.
            task = asyncio.current_task()
            if task is not None:
                self.running.discard(task)

    async def _one_group(self) -> None:
        batch, self.queue = self.queue[: self.size], self.queue[self.size :]
        batch.sort(key=_lock_order)
        if len(batch) == 1:
            await self._alone(batch[0])
            return
        try:
            results = await asyncio.create_task(
                self._together(batch), context=self.context.copy()
            )
        except Exception:  # every apply runs again alone and reports its own outcome
            self.fallbacks += 1
            await asyncio.gather(*(self._alone(job) for job in batch))
            return
        self.batches += 1
        for job, result in zip(batch, results, strict=True):
            if not job.done.done():
                job.done.set_result(result)

    async def _together(self, batch: list[_Job]) -> list[Applied]:
        handlers = self.handlers
        async with handlers.db.unit_of_work() as uow:
            results = [
                await handlers._apply_in(uow, job.resource.model_copy(deep=True))
                for job in batch
            ]
            await uow.commit()
        if any(result.changed for result, _extra in results):
            await handlers.after_commit()
        return results

    async def _alone(self, job: _Job) -> None:
        task = asyncio.create_task(
            self.handlers.apply_alone(job.resource), context=self.context.copy()
        )
        try:
            result = await task
        except Exception as exc:  # handed to the request that sent it
            if not job.done.done():
                job.done.set_exception(exc)
            return
        if not job.done.done():
            job.done.set_result(result)


def _lock_order(job: _Job) -> tuple[str, str, list[tuple[str, str]], str]:
    meta = job.resource.metadata
    return (job.resource.kind, meta.namespace or "", sorted(meta.labels.items()), meta.name)


def owned_kinds(service: str) -> frozenset[str]:
    return frozenset(k for k, cls in KINDS.items() if service == cls.OWNER)
