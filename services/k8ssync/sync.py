"""List-then-watch of each Kubernetes kind, fed to the service that owns the kind.

One :class:`Reflector` per kind: list every page, apply every object, delete what the sync had
applied before and the list no longer has, then watch from the list's resourceVersion. Each
event (and each bookmark) advances the resourceVersion we resume from when a watch ends or the
connection drops; a 410 Gone (too old) leads to a fresh list. A failure to reach the owning
service is retried, never skipped, so the services converge on what the cluster holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from ciliate.client import ApiError, Client
from ciliate.resources.registry import owner_of
from services.k8ssync.core.convert import (
    ObjectKey,
    key_of,
    policy_condition,
    to_document,
    vanished,
)
from services.k8ssync.core.kinds import ApiKind
from services.k8ssync.core.watchstream import EventType, WatchEvent, WatchProtocolError
from services.k8ssync.kubeapi import Gone, KubeApiError, KubeClient

log = logging.getLogger("ciliate.k8s-sync")

STATUS_OWNED_KINDS = frozenset({"CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"})
"""Kinds whose ``status`` the sync itself writes: never fed back to the owner as input."""

RETRY_MIN, RETRY_MAX = 0.2, 10.0


class Sink(Protocol):
    """Where objects go: the owning services (REST), or a recorder in unit tests."""

    async def apply(self, doc: dict[str, Any]) -> None: ...
    async def delete(self, key: ObjectKey) -> None: ...
    async def stored(self, kind: str) -> list[dict[str, Any]]: ...


class Rejected(Exception):
    """The owner refused an object (validation): retrying would not help."""

    def __init__(self, key: ObjectKey, status: int, detail: str) -> None:
        super().__init__(f"{key.kind} {key.namespace}/{key.name}: {status} {detail}")
        self.key, self.status, self.detail = key, status, detail


def _detail(exc: ApiError) -> str:
    body = exc.body
    if isinstance(body, dict):
        errors = body.get("errors") or []
        parts = [f"{e.get('field')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
        return "; ".join(parts) or str(body.get("detail") or body.get("title") or body)
    return str(body)


class OwnerSink:
    """Applies through ``POST /v1/resources`` of the kind's owner (``owner_of``)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def apply(self, doc: dict[str, Any]) -> None:
        key = key_of(doc)
        try:
            await self.client.post(owner_of(key.kind), "/v1/resources", doc)
        except ApiError as exc:
            if 400 <= exc.status < 500 and exc.status not in (401, 403, 408, 409, 429):
                raise Rejected(key, exc.status, _detail(exc)) from None
            raise

    async def delete(self, key: ObjectKey) -> None:
        try:
            await self.client.delete(owner_of(key.kind), key.rest_path())
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def stored(self, kind: str) -> list[dict[str, Any]]:
        body = await self.client.get(owner_of(kind), f"/v1/resources/{kind}")
        return list(body.get("items") or [])


async def retrying(what: str, action: Callable[[], Awaitable[Any]],
                   stop: asyncio.Event | None = None) -> Any:
    """Run ``action`` until it succeeds, backing off; :class:`Rejected` passes through."""
    delay = RETRY_MIN
    while True:
        try:
            return await action()
        except Rejected:
            raise
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
        if stop is not None and stop.is_set():
            raise asyncio.CancelledError
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


@dataclass
class KindStats:
    resource_version: str = ""
    lists: int = 0
    gone: int = 0
    events: int = 0
    bookmarks: int = 0
    applied: int = 0
    deleted: int = 0
    rejected: dict[str, str] = field(default_factory=dict)
    synced: bool = False
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"resourceVersion": self.resource_version, "lists": self.lists,
                "gone": self.gone, "events": self.events, "bookmarks": self.bookmarks,
                "applied": self.applied, "deleted": self.deleted, "synced": self.synced,
                "rejected": dict(self.rejected), "lastError": self.last_error}


StatusWriter = Callable[[ApiKind, dict[str, Any], str | None], Awaitable[None]]
"""Called with (kind, object, rejection message or None) after each apply of a kind whose
status the sync writes."""
Observer = Callable[[EventType, ApiKind, dict[str, Any]], None]


class Reflector:
    def __init__(self, kind: ApiKind, kube: KubeClient, sink: Sink, *,
                 watch_timeout: int = 300, status_writer: StatusWriter | None = None,
                 observers: list[Observer] | None = None) -> None:
        self.kind = kind
        self.kube = kube
        self.sink = sink
        self.watch_timeout = watch_timeout
        self.status_writer = status_writer
        self.observers = observers or []
        self.stats = KindStats()

    async def run(self) -> None:
        """Forever: list (when we have no resourceVersion), then watch from it."""
        delay = RETRY_MIN
        rv = ""
        while True:
            try:
                if not rv:
                    rv = await self.relist()
                rv = await self.watch(rv)
                delay = RETRY_MIN
            except Gone as exc:
                log.info("%s: %s; relisting", self.kind.plural, exc)
                self.stats.gone += 1
                rv = ""
            except (KubeApiError, aiohttp.ClientError, OSError, TimeoutError,
                    WatchProtocolError) as exc:
                self.stats.last_error = str(exc)
                log.warning("%s: %s; retrying in %.1fs", self.kind.plural, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def relist(self) -> str:
        items, rv = await self.kube.list(self.kind)
        listed: set[ObjectKey] = set()
        for item in items:
            await self._apply(item, EventType.ADDED)
            listed.add(key_of(item, self.kind.kind))
        stored = await retrying(f"list stored {self.kind.kind}",
                                lambda: self.sink.stored(self.kind.kind))
        for key in vanished(stored, listed, self.kind.kind):
            await self._delete(key, None)
        self.stats.lists += 1
        self.stats.synced = True
        self.stats.resource_version = rv
        return rv

    async def watch(self, rv: str) -> str:
        """Follow one watch stream; returns the resourceVersion to resume from."""
        async for event in self.kube.watch(self.kind, rv, self.watch_timeout):
            rv = await self.handle(event, rv)
        return rv

    async def handle(self, event: WatchEvent, rv: str) -> str:
        if event.type is EventType.ERROR:
            if event.is_gone:
                raise Gone(410, event.object, f"watch {self.kind.plural}")
            raise KubeApiError(event.status_code, event.object, f"watch {self.kind.plural}")
        self.stats.events += 1
        if event.type is EventType.BOOKMARK:
            self.stats.bookmarks += 1
        elif event.type is EventType.DELETED:
            await self._delete(key_of(event.object, self.kind.kind), event.object)
        else:
            await self._apply(event.object, event.type)
        new_rv = event.resource_version or rv
        self.stats.resource_version = new_rv
        return new_rv

    async def _apply(self, obj: dict[str, Any], how: EventType) -> None:
        doc = to_document(obj, self.kind.kind, self.kind.api_version)
        if self.kind.kind in STATUS_OWNED_KINDS:
            doc.pop("status", None)
        key = key_of(doc)
        label = f"{key.namespace}/{key.name}" if key.namespace else key.name
        problem: str | None = None
        try:
            await retrying(f"apply {self.kind.kind} {label}", lambda: self.sink.apply(doc))
            self.stats.applied += 1
            self.stats.rejected.pop(label, None)
        except Rejected as exc:
            problem = exc.detail
            self.stats.rejected[label] = problem
            log.warning("%s %s refused by %s: %s", self.kind.kind, label,
                        owner_of(self.kind.kind), problem)
        for observe in self.observers:
            observe(how, self.kind, obj)
        if self.status_writer is not None:
            try:
                await self.status_writer(self.kind, obj, problem)
            except (KubeApiError, aiohttp.ClientError, OSError) as exc:
                log.warning("status of %s %s not written: %s", self.kind.kind, label, exc)

    async def _delete(self, key: ObjectKey, obj: dict[str, Any] | None) -> None:
        await retrying(f"delete {key.kind} {key.namespace}/{key.name}",
                       lambda: self.sink.delete(key))
        self.stats.deleted += 1
        if obj is not None:
            for observe in self.observers:
                observe(EventType.DELETED, self.kind, obj)


class PolicyStatusWriter:
    """Writes ``status.conditions`` (type ``Valid``) on Cilium policies through the status
    subresource, only when the verdict changes (our own write comes back as a MODIFIED)."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.last: dict[tuple[str, str, str], tuple[bool, str]] = {}

    async def __call__(self, kind: ApiKind, obj: dict[str, Any], problem: str | None) -> None:
        key = key_of(obj, kind.kind)
        verdict = (problem is None, problem or "policy accepted")
        current = [c for c in (obj.get("status") or {}).get("conditions") or []
                   if c.get("type") == "Valid"]
        written = (current[0].get("status") == ("True" if verdict[0] else "False")
                   and current[0].get("message") == verdict[1]) if current else False
        if written or self.last.get((key.kind, key.namespace, key.name)) == verdict:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        patch = {"status": {"conditions": [policy_condition(verdict[0], verdict[1], now)]}}
        await self.kube.merge_patch(kind, key.namespace or None, key.name, patch, "status")
        self.last[(key.kind, key.namespace, key.name)] = verdict


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
