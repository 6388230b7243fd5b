"""A local stand-in for the Kubernetes API server, speaking its real HTTP protocol.

Built from the API's documented shapes (API concepts: "Efficient detection of changes",
"Retrieving large results sets in chunks", "Watch bookmarks"):
- ``GET <collection>?limit=N[&continue=T]`` returns a ``<Kind>List`` whose ``metadata`` carries
  ``resourceVersion`` and, while more remain, ``continue``; all pages come from one snapshot,
  and a continue token older than the compaction floor answers 410 ``Expired``.
- ``GET <collection>?watch=1&resourceVersion=RV[&allowWatchBookmarks=true][&timeoutSeconds=S]``
  streams chunked JSON lines ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``
  of every change after RV (without RV: synthetic ADDED for current objects first); an RV
  older than the floor yields one ``ERROR`` event carrying a 410 ``Status``. Each event is
  written in two pieces split at an arbitrary byte, so chunk boundaries never match lines.
- POST/PUT (optimistic concurrency on ``metadata.resourceVersion``)/merge-PATCH (also on the
  ``status`` subresource)/DELETE of objects, with Status bodies for 404/409.
Tests drive it with :meth:`put`, :meth:`remove`, :meth:`compact` and :meth:`expire_watches`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from services.k8ssync.core.kinds import BY_KIND, ApiKind

BY_PLURAL: dict[tuple[str, str], ApiKind] = {(k.group, k.plural): k for k in BY_KIND.values()}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass
class Change:
    rv: int
    kind: ApiKind
    type: str
    obj: dict[str, Any]


@dataclass
class Watcher:
    kind: ApiKind
    namespace: str | None
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


class FakeApiServer:
    def __init__(self, bookmark_interval: float = 0.2) -> None:
        self.rv = 100
        self.floor = 0
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: list[Change] = []
        self.watchers: list[Watcher] = []
        self.snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self.bookmark_interval = bookmark_interval
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.token = "k8s-token"
        self.app = web.Application()
        self.app.router.add_route("*", "/{path:.*}", self.dispatch)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        for watcher in self.watchers:
            watcher.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    # --- test controls -----------------------------------------------------------------

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _record(self, kind: ApiKind, type_: str, obj: dict[str, Any]) -> None:
        change = Change(self.rv, kind, type_, copy.deepcopy(obj))
        self.history.append(change)
        for watcher in self.watchers:
            if watcher.kind == kind and self._in_ns(obj, watcher.namespace):
                watcher.queue.put_nowait({"type": type_, "object": change.obj})

    @staticmethod
    def _in_ns(obj: dict[str, Any], namespace: str | None) -> bool:
        return namespace is None or obj["metadata"].get("namespace") == namespace

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object as a controller would (no concurrency check)."""
        kind = BY_KIND[obj["kind"]]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        key = (kind.kind, meta.get("namespace", ""), meta["name"])
        old = self.objects.get(key)
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        meta["creationTimestamp"] = (old["metadata"]["creationTimestamp"] if old else
                                     datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["managedFields"] = [{"manager": "kubectl", "operation": "Update"}]
        meta["resourceVersion"] = self._bump()
        self.objects[key] = obj
        self._record(kind, "MODIFIED" if old else "ADDED", obj)
        return obj

    def remove(self, kind_name: str, namespace: str, name: str) -> None:
        kind = BY_KIND[kind_name]
        obj = self.objects.pop((kind.kind, namespace if kind.namespaced else "", name))
        obj["metadata"]["resourceVersion"] = self._bump()
        self._record(kind, "DELETED", obj)

    def forget(self, kind_name: str, namespace: str, name: str) -> None:
        """Delete with no event: a deletion that happened inside a compacted gap, which only
        a relist can reveal."""
        kind = BY_KIND[kind_name]
        del self.objects[(kind.kind, namespace if kind.namespaced else "", name)]
        self._bump()

    def get(self, kind_name: str, namespace: str, name: str) -> dict[str, Any] | None:
        kind = BY_KIND[kind_name]
        return self.objects.get((kind.kind, namespace if kind.namespaced else "", name))

    def compact(self) -> None:
        """Forget history up to now, as etcd compaction does: older RVs now answer 410."""
        self.floor = self.rv + 1
        self.history = []

    def expire_watches(self) -> None:
        """Compact and tell every open watch its RV is too old (ERROR 410), ending it."""
        self.compact()
        for watcher in self.watchers:
            watcher.queue.put_nowait({"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: ({self.floor})")})
            watcher.queue.put_nowait(None)

    def drop_watches(self) -> None:
        """End every open watch without an error, as a server timeout or restart does."""
        for watcher in self.watchers:
            watcher.queue.put_nowait(None)

    # --- HTTP --------------------------------------------------------------------------

    def _route(self, path: str) -> tuple[ApiKind, str | None, str | None, str]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            raise web.HTTPNotFound()
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or (group, rest[0]) not in BY_PLURAL:
            raise web.HTTPNotFound(text=json.dumps(status(404, "NotFound", path)))
        kind = BY_PLURAL[(group, rest[0])]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        return kind, namespace, name, sub

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        kind, namespace, name, sub = self._route(request.path)
        if name is None:
            if request.method == "GET" and request.query.get("watch") in ("1", "true"):
                return await self._watch(request, kind, namespace)
            if request.method == "GET":
                return self._list(request, kind, namespace)
            if request.method == "POST":
                return self._create(kind, namespace, await request.json())
        else:
            key = (kind.kind, namespace or "", name)
            if request.method == "GET":
                obj = self.objects.get(key)
                if obj is None:
                    return self._missing(kind, name)
                return web.json_response(obj)
            if request.method == "PUT":
                return self._replace(kind, key, await request.json())
            if request.method == "PATCH":
                return self._patch(kind, key, await request.json(), sub)
            if request.method == "DELETE":
                if key not in self.objects:
                    return self._missing(kind, name)
                obj = self.objects[key]
                self.remove(kind.kind, namespace or "", name)
                return web.json_response(obj)
        return web.json_response(status(405, "MethodNotAllowed", request.method), status=405)

    @staticmethod
    def _missing(kind: ApiKind, name: str) -> web.Response:
        return web.json_response(status(404, "NotFound", f'{kind.plural} "{name}" not found'),
                                 status=404)

    def _create(self, kind: ApiKind, namespace: str | None,
                body: dict[str, Any]) -> web.Response:
        body.setdefault("metadata", {})
        if namespace:
            body["metadata"]["namespace"] = namespace
        key = (kind.kind, body["metadata"].get("namespace", ""), body["metadata"]["name"])
        if key in self.objects:
            return web.json_response(status(409, "AlreadyExists", "already exists"), status=409)
        return web.json_response(self.put({**body, "kind": kind.kind}), status=201)

    def _replace(self, kind: ApiKind, key: tuple[str, str, str],
                 body: dict[str, Any]) -> web.Response:
        current = self.objects.get(key)
        if current is None:
            return self._missing(kind, key[2])
        sent = body.get("metadata", {}).get("resourceVersion")
        if sent != current["metadata"]["resourceVersion"]:
            return web.json_response(status(409, "Conflict", "the object has been modified"),
                                     status=409)
        return web.json_response(self.put({**body, "kind": kind.kind}))

    def _patch(self, kind: ApiKind, key: tuple[str, str, str], patch: dict[str, Any],
               sub: str) -> web.Response:
        current = self.objects.get(key)
        if current is None:
            return self._missing(kind, key[2])
        if sub == "status":
            patch = {"status": patch.get("status")}
        return web.json_response(self.put(_merge(copy.deepcopy(current), patch)))

    def _list(self, request: web.Request, kind: ApiKind,
              namespace: str | None) -> web.Response:
        token = request.query.get("continue")
        limit = int(request.query.get("limit", "0") or 0)
        if token:
            decoded = json.loads(base64.b64decode(token))
            snap = self.snapshots.get(decoded["id"])
            if snap is None or snap[0] < self.floor:
                return web.json_response(status(
                    410, "Expired", "The provided continue parameter is too old"), status=410)
            rv, items = snap
            start = decoded["start"]
        else:
            rv = self.rv
            items = sorted((copy.deepcopy(o) for (k, _, _), o in self.objects.items()
                            if k == kind.kind and self._in_ns(o, namespace)),
                           key=lambda o: (o["metadata"].get("namespace", ""),
                                          o["metadata"]["name"]))
            for item in items:  # list items carry neither kind nor apiVersion
                item.pop("kind", None)
                item.pop("apiVersion", None)
            start = 0
        end = start + limit if limit else len(items)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if end < len(items):
            snap_id = uuid.uuid4().hex
            self.snapshots[snap_id] = (rv, items)
            meta["continue"] = base64.b64encode(
                json.dumps({"id": snap_id, "start": end}).encode()).decode()
            meta["remainingItemCount"] = len(items) - end
        return web.json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                                  "metadata": meta, "items": items[start:end]})

    async def _watch(self, request: web.Request, kind: ApiKind,
                     namespace: str | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        rv_param = request.query.get("resourceVersion", "")
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        watcher = Watcher(kind, namespace)
        if rv_param not in ("", "0") and int(rv_param) < self.floor:
            await self._send(resp, {"type": "ERROR", "object": status(
                410, "Expired", f"too old resource version: {rv_param} ({self.floor})")})
            return resp
        if rv_param in ("", "0"):
            for (k, _, _), obj in sorted(self.objects.items()):
                if k == kind.kind and self._in_ns(obj, namespace):
                    watcher.queue.put_nowait({"type": "ADDED", "object": obj})
        else:
            for change in self.history:
                if change.rv > int(rv_param) and change.kind == kind and self._in_ns(
                        change.obj, namespace):
                    watcher.queue.put_nowait({"type": change.type, "object": change.obj})
        self.watchers.append(watcher)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                wait = min(self.bookmark_interval, deadline - loop.time())
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), max(wait, 0.001))
                except TimeoutError:
                    if bookmarks:
                        await self._send(resp, {"type": "BOOKMARK", "object": {
                            "kind": kind.kind, "apiVersion": kind.api_version,
                            "metadata": {"resourceVersion": str(self.rv)}}})
                    continue
                if event is None:
                    break
                await self._send(resp, event)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.remove(watcher)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, event: dict[str, Any]) -> None:
        data = (json.dumps(event) + "\n").encode()
        cut = max(1, len(data) // 3)
        await resp.write(data[:cut])
        await resp.write(data[cut:])


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7386)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = _merge(target[key], value)
        else:
            target[key] = value
    return target
