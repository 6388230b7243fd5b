"""Wires the lb service: Service and EndpointSlice objects in (REST, SQL), pod endpoints in
(KV ``endpoints``), frontends, backends and Maglev tables out (KV ``lb``, see docs/lb.md).

ClusterIPs and node ports are allocated inside the resource transaction (SQL primary keys
refuse a second owner: 409), and written into the stored Service as Kubernetes does. The
in-memory :class:`LbState` learns of a change after its commit; a publisher task renders
whatever accumulated (bursts coalesce) and writes only the KV entries that changed.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from aiohttp import web
from sqlalchemy.exc import IntegrityError

from ciliate.api import field_problem, read_object, route
from ciliate.api.resources import ResourceHandlers, owned_kinds
from ciliate.bus import KV, Bucket, KVMirror, codec
from ciliate.bus.subjects import kv_subject
from ciliate.resources.base import Resource
from ciliate.resources.core import EndpointSlice, LbAlgorithm, Service, ServiceType
from ciliate.runner import ServiceContext, ServiceSpec
from ciliate.store import Database, DatabaseUnavailable, ResourceRepository, StoredResource
from ciliate.store.database import UnitOfWork
from services.lb.core.allocation import (
    DEFAULT_SERVICE_CIDR,
    RangeFull,
    ServiceRanges,
)
from services.lb.core.maglev import DEFAULT_HASH_SEED, DEFAULT_TABLE_SIZE, table_from_bytes
from services.lb.core.model import SERVICE_PREFIX, TABLE_PREFIX, BackendState, L3n4
from services.lb.core.state import Changes, LbState, needed_ids
from services.lb.repository import BACKEND, FRONTEND, Conflict, LbRepository

Change = tuple[str, Resource | None, str, str]
"""(kind, applied object or None for a delete, namespace, name)."""

_pending: contextvars.ContextVar[list[Change] | None] = contextvars.ContextVar(
    "lb_pending", default=None)

ID_ATTEMPTS = 20
SHARED_FIELDS = ("backends", "tables", "local_tables")
"""Fields of a Service value that Services with the same backends share (in this order, last)."""
PIPELINE_MIN = 32
"""From this many Service puts on, pipeline them (see ``put_pipelined``)."""
MAGLEV_PREVIEW = 20
"""Slots ``lb maglev get`` shows."""


def _l3n4(key: str) -> L3n4:
    """Parse ``10.0.0.1:80/TCP`` (IPv6 as ``[fd00::1]:80/TCP``)."""
    hostport, _, protocol = key.rpartition("/")
    host, _, port = hostport.rpartition(":")
    return L3n4(host.strip("[]"), int(port), protocol.upper())


class LbService:
    def __init__(self, db: Database, kv: KV, endpoints: KV, ranges: ServiceRanges,
                 state: LbState, log: Any = None) -> None:
        self.db = db
        self.kv = kv
        self.endpoints_kv = endpoints
        self.ranges = ranges
        self.state = state
        self.log = log
        self.rng = random.Random()
        self.backend_ids: dict[L3n4, int] = {}
        self.frontend_ids: dict[str, int] = {}
        self.wake = asyncio.Event()
        self.rounds = 0
        """Publish rounds completed (tests wait on it)."""
        self.round_done = asyncio.Condition()
        self.mirror = KVMirror(endpoints, self.on_endpoint)
        self.kv_keys: set[str] = set()
        self._packed: tuple[Any, bytes] | None = None

    # --- inputs --------------------------------------------------------------------------

    async def on_endpoint(self, key: str, _old: Any, new: Any) -> None:
        self.state.set_endpoint(key, new if isinstance(new, dict) else None)
        self.wake.set()

    def _take(self, resource: Resource | None, kind: str, namespace: str, name: str) -> None:
        if kind == "Service":
            if isinstance(resource, Service):
                self.state.set_service(resource)
            else:
                self.state.delete_service(namespace, name)
        elif kind == "EndpointSlice":
            if isinstance(resource, EndpointSlice):
                self.state.set_slice(resource)
            else:
                self.state.delete_slice(namespace, name)

    async def reload(self) -> None:
        """Take the whole SQL state (start, and periodically so replicas converge)."""
        async with self.db.unit_of_work() as uow:
            repo = ResourceRepository(uow.session)
            services = await repo.list("Service")
            slices = await repo.list("EndpointSlice")
            states = await LbRepository(uow.session).backend_states()
        seen_services = set()
        for stored in services:
            svc = Service.model_validate(stored.to_document())
            self.state.set_service(svc)
            seen_services.add((stored.namespace, stored.name))
        for ref in set(self.state.services) - seen_services:
            self.state.delete_service(*ref)
        seen_slices = set()
        for stored in slices:
            self.state.set_slice(EndpointSlice.model_validate(stored.to_document()))
            seen_slices.add((stored.namespace, stored.name))
        for ref in set(self.state.slices) - seen_slices:
            self.state.delete_slice(*ref)
        overrides = {_l3n4(k): BackendState(v) for k, v in states.items()}
        for backend in set(self.state.overrides) | set(overrides):
            self.state.set_override(backend, overrides.get(backend))
        self.wake.set()

    # --- REST hooks ----------------------------------------------------------------------

    def _pending(self) -> list[Change]:
        current = _pending.get()
        if current is None:
            current = []
            _pending.set(current)
        return current

    async def on_apply(self, uow: UnitOfWork, resource: Resource, old: StoredResource | None,
                       dry_run: bool) -> dict[str, Any]:
        namespace = resource.metadata.namespace or "default"
        name = resource.metadata.name
        if isinstance(resource, Service):
            try:
                await self.allocate(LbRepository(uow.session), resource, old)
            except Conflict as exc:
                raise field_problem(409, exc.field, exc.message) from None
            except RangeFull as exc:
                raise field_problem(422, "spec.clusterIP", str(exc)) from None
        if not dry_run:
            self._pending().append((resource.kind, resource, namespace, name))
        return {}

    async def allocate(self, repo: LbRepository, svc: Service, old: StoredResource | None
                       ) -> None:
        """Check, keep, allocate and claim the Service's ClusterIP and node ports."""
        spec = svc.spec
        owner = f"{svc.metadata.namespace}/{svc.metadata.name}"
        old_spec = dict(old.spec.get("spec") or {}) if old is not None else {}
        old_ip = old_spec.get("clusterIP")
        if spec.type == ServiceType.EXTERNAL_NAME:
            await repo.release(owner)
            return
        if spec.clusterIP and spec.clusterIP != "None":
            problem = self.ranges.ip_problem(spec.clusterIP)
            if problem:
                raise field_problem(422, "spec.clusterIP", problem)
            if old_ip and old_ip != spec.clusterIP:
                raise field_problem(422, "spec.clusterIP",
                                    f"field is immutable (allocated {old_ip})")
        for index, ip in enumerate(spec.clusterIPs):
            if ip and ip != "None" and (problem := self.ranges.ip_problem(ip)):
                raise field_problem(422, f"spec.clusterIPs[{index}]", problem)
        for index, port in enumerate(spec.ports):
            if port.nodePort is not None and (problem := self.ranges.node_port_problem(
                    port.nodePort)):
                raise field_problem(422, f"spec.ports[{index}].nodePort", problem)
        if not spec.clusterIP:
            spec.clusterIP = old_ip if old_ip and old_ip != "None" else None
        if not spec.clusterIP:
            spec.clusterIP = self.ranges.pick_ip(await repo.taken_addresses(), self.rng)
        if spec.clusterIP != "None":
            spec.clusterIPs = [spec.clusterIP]
            await repo.claim_address(spec.clusterIP, owner, "spec.clusterIP")
        keep_ports: set[tuple[int, str]] = set()
        if spec.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER):
            previous = {(p.get("name") or "", p.get("protocol", "TCP")): p.get("nodePort")
                        for p in old_spec.get("ports") or ()}
            for index, port in enumerate(spec.ports):
                if port.nodePort is None:
                    reuse = previous.get((port.name or "", port.protocol))
                    port.nodePort = int(reuse) if reuse else self.ranges.pick_node_port(
                        await repo.taken_node_ports(port.protocol), self.rng)
                await repo.claim_node_port(port.nodePort, port.protocol, owner,
                                           f"spec.ports[{index}].nodePort")
                keep_ports.add((port.nodePort, port.protocol))
        keep = {spec.clusterIP} if spec.clusterIP and spec.clusterIP != "None" else set()
        await repo.release(owner, keep, keep_ports)

    async def on_delete(self, uow: UnitOfWork, stored: StoredResource) -> dict[str, Any]:
        if stored.kind == "Service":
            await LbRepository(uow.session).release(f"{stored.namespace}/{stored.name}")
        self._pending().append((stored.kind, None, stored.namespace, stored.name))
        return {}

    async def after_commit(self) -> None:
        pending = _pending.get()
        _pending.set(None)
        for kind, resource, namespace, name in pending or ():
            self._take(resource, kind, namespace, name)
        self.wake.set()

    # --- publishing ----------------------------------------------------------------------

    async def ensure_ids(self, backends: Iterable[L3n4], fronts: Iterable[str]) -> None:
        """Stable ids from SQL for every backend and frontend not yet known."""
        missing_b = {b.key: b for b in backends if b not in self.backend_ids}
        missing_f = {f for f in fronts if f not in self.frontend_ids}
        if not missing_b and not missing_f:
            return
        for attempt in range(ID_ATTEMPTS):
            try:
                async with self.db.unit_of_work() as uow:
                    repo = LbRepository(uow.session)
                    got_b = await repo.allocate_ids(BACKEND, missing_b) if missing_b else {}
                    got_f = await repo.allocate_ids(FRONTEND, missing_f) if missing_f else {}
                    await uow.commit()
                break
            except IntegrityError:
                if attempt == ID_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(self.rng.uniform(0.001, 0.02))
        self.backend_ids.update({missing_b[k]: i for k, i in got_b.items()})
        self.frontend_ids.update(got_f)

    async def publish(self, changes: Changes) -> None:
        """Tables first, then the Services pointing at them, then deletions: a reader never
        finds a Service whose table is missing."""
        tables = {k: v for k, v in changes.puts.items() if k.startswith(TABLE_PREFIX)}
        await asyncio.gather(*(self.kv.put(k, v) for k, v in tables.items()))
        services = [(k, v) for k, v in changes.puts.items() if k not in tables]
        try:
            await self.put_pipelined(services)
        except Exception:
            for key, _value in services:
                _, namespace, name = key.split(".", 2)
                self.state.published.pop((namespace, name), None)
                self.state.dirty.add((namespace, name))
            raise
        await asyncio.gather(*(self.kv.delete(k) for k in sorted(changes.deletes)))
        self.kv_keys |= set(changes.puts)
        self.kv_keys -= changes.deletes

    async def put_pipelined(self, items: list[tuple[str, Any]]) -> None:
        """Many puts without a round trip each: plain publishes on the bucket's subjects, then
        one acknowledged put. JetStream stores one connection's messages in order, so the
        last acknowledgement vouches for the ones before it."""
        if len(items) < PIPELINE_MIN:
            await asyncio.gather(*(self.kv.put(k, v) for k, v in items))
            return
        *head, (last_key, last_value) = items
        for key, value in head:
            await self.kv.bus.publish_raw(kv_subject(Bucket.LB, key), self.pack(value))
        await self.kv.put(last_key, last_value)

    def pack(self, value: dict[str, Any]) -> bytes:
        """msgpack of a Service value, its shared backend part packed once per round: the
        same bytes ``codec.pack`` gives (a map is its header and its packed pairs)."""
        if len(value) >= 16 or not all(k in value for k in SHARED_FIELDS):
            return codec.pack(value)  # beyond a msgpack fixmap: pack it whole
        shared = value["backends"]
        if self._packed is None or self._packed[0] is not shared:
            tail = b"".join(codec.pack(k) + codec.pack(value[k]) for k in SHARED_FIELDS)
            self._packed = (shared, tail)
        head = b"".join(codec.pack(k) + codec.pack(v) for k, v in value.items()
                        if k not in SHARED_FIELDS)
        return bytes([0x80 | len(value)]) + head + self._packed[1]

    async def step(self) -> Changes:
        """Render and publish everything that changed since the last step."""
        items = self.state.take_dirty()
        backends, fronts = needed_ids(items)
        await self.ensure_ids(backends, fronts)
        changes = self.state.render(items, self.backend_ids, self.frontend_ids)
        if changes:
            await self.publish(changes)
        return changes

    async def prune_stale(self) -> None:
        """Delete KV ``lb`` entries nothing renders any more (a Service deleted while no
        replica ran)."""
        wanted = {f"{SERVICE_PREFIX}{ns}.{name}" for ns, name in self.state.published}
        wanted |= set(self.state.tables)
        current = await self.kv.items()
        stale = [k for k in current if k.startswith((SERVICE_PREFIX, TABLE_PREFIX))
                 and k not in wanted]
        await asyncio.gather(*(self.kv.delete(k) for k in stale))

    async def run(self) -> None:
        await self.mirror.synced.wait()
        first = True
        while True:
            await self.wake.wait()
            self.wake.clear()
            try:
                await self.step()
                if first:
                    await self.prune_stale()
                    first = False
            except Exception:
                if self.log is not None:
                    self.log.exception("lb publish failed; retrying")
                self.wake.set()
                await asyncio.sleep(0.5)
                continue
            async with self.round_done:
                self.rounds += 1
                self.round_done.notify_all()

    async def resync_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except DatabaseUnavailable as exc:
                if self.log is not None:
                    self.log.warning("lb resync skipped: %s", exc)

    async def set_backend_state(self, backend: L3n4, state: BackendState) -> None:
        stored = None if state == BackendState.ACTIVE else state.value
        async with self.db.unit_of_work() as uow:
            await LbRepository(uow.session).set_backend_state(backend.key, stored)
            await uow.commit()
        self.state.set_override(backend, state)
        self.wake.set()

    # --- REST views ----------------------------------------------------------------------

    def service_values(self) -> list[dict[str, Any]]:
        return [self.state.published[ref] for ref in sorted(self.state.published)]

    async def list_services(self, _request: web.Request) -> web.Response:
        return web.json_response(self.service_values())

    def _one(self, request: web.Request) -> dict[str, Any]:
        ref = (request.match_info["namespace"], request.match_info["name"])
        value = self.state.published.get(ref)
        if value is None:
            raise field_problem(404, "name", f"no load-balanced Service {ref[0]}/{ref[1]}")
        return value

    async def get_service(self, request: web.Request) -> web.Response:
        return web.json_response(self._one(request))

    async def get_maglev(self, request: web.Request) -> web.Response:
        value = self._one(request)
        addresses = {b["id"]: f"{b['address']}:{b['port']}/{b['protocol']}"
                     for b in value["backends"]}
        ports: list[dict[str, Any]] = []
        for port_name, key in sorted(value["tables"].items()):
            entry = self.state.table(key) if key else None
            if entry is None:
                ports.append({"port_name": port_name, "table": None})
                continue
            table = table_from_bytes(entry.table)
            ids, counts = np.unique(table, return_counts=True)
            ports.append({
                "port_name": port_name,
                "table": key,
                "m": entry.m,
                "backend_ids": list(entry.backend_ids),
                "counts": {str(int(i)): int(c) for i, c in zip(ids, counts, strict=True)},
                "backends": {str(i): addresses.get(i, "") for i in entry.backend_ids},
                "first": [int(x) for x in table[:MAGLEV_PREVIEW]],
            })
        return web.json_response({"namespace": value["namespace"], "name": value["name"],
                                  "algorithm": value["algorithm"], "ports": ports})

    async def put_backend_state(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        try:
            backend = _l3n4(str(body.get("backend", "")))
        except ValueError:
            raise field_problem(422, "backend", "expected ADDRESS:PORT/PROTOCOL") from None
        try:
            state = BackendState(str(body.get("state", "")))
        except ValueError:
            raise field_problem(422, "state", f"one of {', '.join(BackendState)}") from None
        await self.set_backend_state(backend, state)
        return web.json_response({"backend": backend.key, "state": state.value})


def _env(ctx: ServiceContext) -> Callable[[str, str], str]:
    env = ctx.settings.extra | dict(os.environ)
    return lambda key, default: env.get(key) or default


async def setup(ctx: ServiceContext) -> None:
    env = _env(ctx)
    ranges = ServiceRanges.parse(env("CILIATE_SERVICE_CIDR", DEFAULT_SERVICE_CIDR),
                                 env("CILIATE_NODE_PORT_RANGE", ""))
    state = LbState(
        table_size=int(env("CILIATE_LB_MAGLEV_TABLE_SIZE", str(DEFAULT_TABLE_SIZE))),
        seed=env("CILIATE_LB_MAGLEV_HASH_SEED", DEFAULT_HASH_SEED),
        default_algorithm=LbAlgorithm(env("CILIATE_LB_ALGORITHM", LbAlgorithm.MAGLEV.value)),
    )
    kv = await ctx.bus.kv(Bucket.LB)
    endpoints = await ctx.bus.kv(Bucket.ENDPOINTS)
    service = LbService(ctx.database, kv, endpoints, ranges, state, log=ctx.log)
    async with ctx.database.unit_of_work() as uow:
        repo = LbRepository(uow.session)
        service.backend_ids = {_l3n4(k): i for k, i in (await repo.ids(BACKEND)).items()}
        service.frontend_ids = await repo.ids(FRONTEND)
    await service.reload()
    handlers = ResourceHandlers(ctx.database, owned_kinds("lb"), on_apply=service.on_apply,
                          on_delete=service.on_delete, after_commit=service.after_commit)
    handlers.register(ctx.app)
    route(ctx.app, "GET", "/v1/lb/services", service.list_services,
          summary="Services as published to KV lb: frontends, backends, tables")
    route(ctx.app, "GET", "/v1/lb/services/{namespace}/{name}", service.get_service,
          summary="one Service as published to KV lb")
    route(ctx.app, "GET", "/v1/lb/maglev/{namespace}/{name}", service.get_maglev,
          summary="the Maglev tables of a Service: slots per backend and the first slots")
    route(ctx.app, "POST", "/v1/lb/backend-states", service.put_backend_state,
          summary="set an operator backend state (active, quarantined, maintenance)")
    ctx.app[LB_SERVICE_KEY] = service
    ctx.spawn(service.mirror.run(), name="lb-endpoints")
    ctx.spawn(service.run(), name="lb-publish")
    resync = float(env("CILIATE_LB_RESYNC_SECONDS", "10"))
    if resync > 0:
        ctx.spawn(service.resync_loop(resync), name="lb-resync")


LB_SERVICE_KEY = web.AppKey("lb_service", LbService)
SPEC = ServiceSpec(name="lb", setup=setup, uses_db=True)
