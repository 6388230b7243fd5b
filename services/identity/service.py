"""Wires the identity service: Namespace and Pod objects in, identities, endpoints and ipcache
out (JetStream KV), and identity allocation over NATS for other services.

Every change is decided inside the resource transaction (SQL constraints arbitrate between
replicas); the KV writes it implies are collected per request and published only after the
commit, so a refused or failed apply publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession

from ciliate.api import Problem, field_problem, route
from ciliate.api.resources import ResourceHandlers, owned_kinds
from ciliate.bus import KV, BadRequest, Bucket
from ciliate.bus.subjects import (
    IDENTITY_ALLOCATE,
    IDENTITY_LOOKUP,
    IDENTITY_RELEASE,
    queue_group,
)
from ciliate.labels import LabelFilter, LabelSet, endpoint_labels
from ciliate.resources.base import Resource
from ciliate.resources.core import Namespace, Pod
from ciliate.runner import ServiceContext, ServiceSpec
from ciliate.store import ResourceRepository, StoredResource
from ciliate.store.database import UnitOfWork
from services.identity.core.allocator import (
    DEFAULT_GRACE_SECONDS,
    LabelSetParser,
    Scope,
    reserved_id_for,
    scope_of,
)
from services.identity.core.cidr import PrefixError, parse_prefix, prefix_of
from services.identity.core.endpoints import (
    Endpoint,
    NamedPort,
    endpoint_key,
    identity_value,
    ipcache_key,
    ipcache_value,
    reserved_identity_values,
)
from services.identity.core.ipam import DEFAULT_CLUSTER_CIDR, DEFAULT_NODE_PREFIX, Ipam, IpamError
from services.identity.core.validation import label_errors
from services.identity.repository import (
    AddressRepository,
    AddressSlots,
    IdentityAllocator,
    IpConflict,
    SchemaMissing,
    missing_tables,
    run_in_transaction,
)

MAX_BATCH = 10_000
"""Label sets per NATS request: bounds one transaction."""
GROUP_COMMIT = 64
"""Pod and Namespace applies per shared transaction (one BEGIN/COMMIT and one KV flush for
the applies that arrived while earlier ones were being written)."""


@dataclass
class Pending:
    """KV writes a request decided; published once its transaction committed."""

    puts: dict[tuple[Bucket, str], Any] = field(default_factory=dict)
    deletes: set[tuple[Bucket, str]] = field(default_factory=set)

    def put(self, bucket: Bucket, key: str, value: Any) -> None:
        self.deletes.discard((bucket, key))
        self.puts[(bucket, key)] = value

    def delete(self, bucket: Bucket, key: str) -> None:
        self.puts.pop((bucket, key), None)
        self.deletes.add((bucket, key))


_pending: contextvars.ContextVar[Pending | None] = contextvars.ContextVar(
    "identity_pending", default=None
)


def _owner(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


class IdentityService:
    def __init__(
        self,
        ctx: ServiceContext,
        ipam: Ipam,
        label_filter: LabelFilter | None = None,
        grace: float = DEFAULT_GRACE_SECONDS,
    ) -> None:
        self.ctx = ctx
        self.db = ctx.database
        self.ipam = ipam
        self.label_filter = label_filter
        self.allocator = IdentityAllocator(grace=grace)
        self.default_node = ctx.settings.node
        self.kvs: dict[Bucket, KV] = {}
        self.parser = LabelSetParser()
        self.slots = AddressSlots()
        """Endpoint ids, addresses and node CIDRs this process knows taken (a hint; SQL decides)."""
        self.cache: dict[str, int] = {}
        """Canonical label key -> id, for lookups; entries leave when an identity is deleted."""

    # --- KV -------------------------------------------------------------------------------

    async def open_buckets(self) -> None:
        for bucket in (Bucket.ENDPOINTS, Bucket.IDENTITIES, Bucket.IPCACHE):
            self.kvs[bucket] = await self.ctx.bus.kv(bucket)

    def pending(self) -> Pending:
        current = _pending.get()
        if current is None:
            current = Pending()
            _pending.set(current)
        return current

    async def flush(self, pending: Pending | None = None) -> None:
        pending = pending if pending is not None else _pending.get()
        if pending is None:
            return
        _pending.set(None)
        await asyncio.gather(
            *(self.kvs[b].put(k, v) for (b, k), v in pending.puts.items()),
            *(self.kvs[b].delete(k) for (b, k) in pending.deletes),
        )

    async def publish_reserved(self) -> None:
        kv = self.kvs[Bucket.IDENTITIES]
        await asyncio.gather(*(kv.put(k, v) for k, v in reserved_identity_values().items()))

    async def resync(self) -> None:
        """Publish the whole SQL state, so the KV buckets match it after any restart."""
        async with self.db.unit_of_work() as uow:
            idents = await self.allocator.list_all(uow.session)
            addresses = AddressRepository(uow.session, self.ipam, self.slots)
            records = await addresses.list_endpoints()
            prefixes = await addresses.list_prefixes()
        pending = Pending()
        for prefix, cidr_ident in prefixes:
            pending.put(
                Bucket.IPCACHE, ipcache_key(prefix), ipcache_value(prefix, cidr_ident, "")
            )
        for ident in idents:
            pending.put(Bucket.IDENTITIES, str(ident.id), identity_value(ident.id, ident.labels))
            self.cache[";".join(ident.labels)] = ident.id
        for record in records:
            pending.put(Bucket.ENDPOINTS, endpoint_key(record["namespace"], record["name"]), record)
            for ip in record["ips"]:
                pending.put(
                    Bucket.IPCACHE,
                    ipcache_key(ip),
                    ipcache_value(ip, record["identity"], record["node"]),
                )
        await self.publish_reserved()
        await self.flush(pending)

    # --- Namespace and Pod objects ---------------------------------------------------------

    async def on_apply(
        self, uow: UnitOfWork, resource: Resource, old: StoredResource | None, dry_run: bool
    ) -> dict[str, Any]:
        errors = label_errors(resource.metadata.labels)
        if errors:
            raise Problem(
                422,
                "; ".join(str(e) for e in errors),
                errors=[{"field": e.path, "message": e.message} for e in errors],
            )
        if dry_run:
            return {}
        if isinstance(resource, Namespace):
            pods = await ResourceRepository(uow.session).list("Pod", resource.metadata.name)
            for stored in pods:
                pod = Pod.model_validate(stored.to_document())
                await self.apply_pod(uow, pod, resource.metadata.labels)
            return {}
        if isinstance(resource, Pod):
            ns_labels = await self.namespace_labels(uow, resource.metadata.namespace or "default")
            return {"endpoint": await self.apply_pod(uow, resource, ns_labels)}
        return {}

    async def namespace_labels(self, uow: UnitOfWork, namespace: str) -> dict[str, str]:
        stored = await ResourceRepository(uow.session).get("Namespace", "", namespace)
        return dict(stored.labels) if stored is not None else {}

    async def apply_pod(
        self, uow: UnitOfWork, pod: Pod, ns_labels: dict[str, str]
    ) -> dict[str, Any]:
        """Identity, addresses and endpoint record of one pod, inside the caller's transaction."""
        session = uow.session
        namespace = pod.metadata.namespace or "default"
        name = pod.metadata.name
        owner = _owner(namespace, name)
        addresses = AddressRepository(session, self.ipam, self.slots)
        labels = endpoint_labels(
            pod.metadata.labels,
            namespace,
            ns_labels,
            service_account=pod.spec.serviceAccountName or "default",
            label_filter=self.label_filter,
        )
        endpoint_id, held, old_record = await addresses.endpoint_state(owner)
        known = endpoint_id is not None  # only a pod seen before holds addresses to keep/free
        node = pod.spec.nodeName or ""
        ips = list(pod.ips)
        try:
            if ips:
                cidr = self.ipam.node_cidr_of(ips[0])
                if not node:
                    node = (await addresses.node_of_cidr(cidr) if cidr else None) or ""
                node = node or self.default_node
                if cidr:
                    await addresses.adopt_node_cidr(node, cidr)
                for ip in ips:
                    await addresses.claim(ip, owner, node)
            else:
                node = node or (old_record or {}).get("node") or self.default_node
                kept = await addresses.of_owner(owner) if known else []
                if kept and pod.spec.nodeName:
                    # A pod seen before it was scheduled got an address of the default node;
                    # once bound elsewhere it needs one its node routes.
                    cidr = await addresses.node_cidr(node)
                    kept = [ip for ip in kept if self.ipam.node_cidr_of(ip) == cidr]
                ips = kept[:1] if kept else [await addresses.allocate(owner, node)]
        except IpConflict as exc:
            raise field_problem(409, "status.podIP", str(exc)) from None
        except IpamError as exc:
            raise field_problem(422, exc.field, exc.message) from None
        freed = await addresses.release(owner, keep=ips) if known else []
        # The identity reference last: its row stays locked until the commit, so the shorter
        # the rest of the transaction after it, the less pods of one identity queue.
        (ident,) = await self.allocator.allocate(session, [labels])
        if held is not None:
            await self.allocator.release(session, [held])

        def endpoint_for(ep_id: int) -> Endpoint:
            return Endpoint(
                id=ep_id,
                namespace=namespace,
                name=name,
                labels=tuple(labels.sorted_strings()),
                identity=ident,
                ips=tuple(ips),
                node=node,
                ports=tuple(
                    NamedPort(p.name or "", p.containerPort, p.protocol) for p in pod.ports
                ),
                pod_labels=dict(pod.metadata.labels),
                ready=pod.ready,
                images=tuple(c.image for c in pod.spec.containers if c.image),
            )

        if endpoint_id is None:
            endpoint_id, inserted = await addresses.create_endpoint(
                owner, ident, lambda ep_id: endpoint_for(ep_id).kv_value()
            )
            endpoint = endpoint_for(endpoint_id)
            record = endpoint.kv_value()
            if not inserted:  # the same pod applied concurrently got its row first
                await addresses.save_endpoint(owner, ident, record)
        else:
            endpoint = endpoint_for(endpoint_id)
            record = endpoint.kv_value()
            await addresses.save_endpoint(owner, ident, record)
        pending = self.pending()
        if reserved_id_for(labels) is None:
            pending.put(
                Bucket.IDENTITIES, str(ident), identity_value(ident, labels.sorted_strings())
            )
        pending.put(Bucket.ENDPOINTS, endpoint.key, record)
        for ip in freed:
            pending.delete(Bucket.IPCACHE, ipcache_key(ip))
        for key, value in endpoint.ipcache_entries().items():
            pending.put(Bucket.IPCACHE, key, value)
        return {"id": endpoint.id, "identity": ident, "ips": list(ips), "node": node}

    async def on_delete(self, uow: UnitOfWork, stored: StoredResource) -> dict[str, Any]:
        if stored.kind == "Pod":
            await self.delete_pod(uow, stored.namespace, stored.name)
            return {}
        if stored.kind == "Namespace":
            repo = ResourceRepository(uow.session)
            pods = await repo.list("Pod", stored.name)
            for pod in pods:
                await self.delete_pod(uow, pod.namespace, pod.name)
                await repo.delete("Pod", pod.namespace, pod.name)
            return {"deletedPods": sorted(p.name for p in pods)}
        return {}

    async def delete_pod(self, uow: UnitOfWork, namespace: str, name: str) -> None:
        owner = _owner(namespace, name)
        addresses = AddressRepository(uow.session, self.ipam, self.slots)
        held, _record = await addresses.endpoint(owner)
        if held is not None:
            await self.allocator.release(uow.session, [held])
        freed = await addresses.release(owner)
        await addresses.release_endpoint_id(owner)
        pending = self.pending()
        pending.delete(Bucket.ENDPOINTS, endpoint_key(namespace, name))
        for ip in freed:
            pending.delete(Bucket.IPCACHE, ipcache_key(ip))

    # --- NATS request/reply ----------------------------------------------------------------

    def parse_label_sets(self, payload: Any) -> list[LabelSet]:
        if not isinstance(payload, dict) or not isinstance(payload.get("labels"), list):
            raise BadRequest("labels", "expected {'labels': [[label, ...], ...]}")
        sets = payload["labels"]
        if len(sets) > MAX_BATCH:
            raise BadRequest("labels", f"at most {MAX_BATCH} label sets per request")
        result: list[LabelSet] = []
        for index, labels in enumerate(sets):
            if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
                raise BadRequest(f"labels[{index}]", "expected a list of label strings")
            result.append(self.parser.parse(labels))
        return result

    @staticmethod
    def parse_prefixes(payload: dict[str, Any], sets: Sequence[LabelSet]) -> list[str | None]:
        """The prefix of each label set: given in ``prefixes`` (aligned with ``labels``, null
        for none) or, for CIDR label sets, the most specific ``cidr:`` label."""
        given = payload.get("prefixes")
        if given is None:
            return [prefix_of(ls) if scope_of(ls) is Scope.CIDR else None for ls in sets]
        if not isinstance(given, list) or len(given) != len(sets):
            raise BadRequest("prefixes", "expected a list aligned with 'labels' (null for none)")
        out: list[str | None] = []
        for index, (text, ls) in enumerate(zip(given, sets, strict=True)):
            if text is None:
                out.append(None)
                continue
            where = f"prefixes[{index}]"
            if not isinstance(text, str):
                raise BadRequest(where, "expected a prefix string such as '10.0.0.0/8'")
            if scope_of(ls) is not Scope.CIDR:
                raise BadRequest(where, f"labels[{index}] has no cidr: label; only CIDR "
                                 "identities carry a prefix")
            try:
                out.append(parse_prefix(text))
            except PrefixError as exc:
                raise BadRequest(where, str(exc)) from None
        return out

    async def handle_allocate(self, payload: Any) -> dict[str, Any]:
        """``{"labels": [[label, ...], ...], "prefixes": [...]?}`` -> ``{"ids": [...]}``: one
        reference per label set; CIDR identities also get an ipcache entry for their prefix."""
        sets = self.parse_label_sets(payload)
        prefixes = self.parse_prefixes(payload, sets)
        created: set[int] = set()

        async def work(session: AsyncSession) -> tuple[list[int], list[tuple[str, int]]]:
            created.clear()  # a retried transaction starts over
            ids = await self.allocator.allocate(session, sets, created=created)
            wanted = {p: i for p, i in zip(prefixes, ids, strict=True) if p is not None}
            changed = (
                await AddressRepository(session, self.ipam, self.slots).claim_prefixes(wanted)
                if wanted
                else []
            )
            return ids, changed

        ids, changed = await run_in_transaction(self.db, work)
        pending = Pending()
        for prefix, ident in changed:
            pending.put(Bucket.IPCACHE, ipcache_key(prefix), ipcache_value(prefix, ident, ""))
        for ls, ident in zip(sets, ids, strict=True):
            self.cache[ls.canonical()] = ident
            if ident in created:
                pending.put(
                    Bucket.IDENTITIES, str(ident), identity_value(ident, ls.sorted_strings())
                )
        await self.flush(pending)
        return {"ids": ids}

    async def handle_release(self, payload: Any) -> dict[str, Any]:
        ids = payload.get("ids") if isinstance(payload, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise BadRequest("ids", "expected {'ids': [int, ...]}")

        async def work(session: AsyncSession) -> tuple[list[int], list[str]]:
            released = await self.allocator.release(session, ids)
            cidr_ids = [i for i in released if Scope.CIDR.contains(i)]
            freed = (
                await AddressRepository(session, self.ipam, self.slots).release_prefixes(cidr_ids)
                if cidr_ids
                else []
            )
            return released, freed

        released, freed = await run_in_transaction(self.db, work)
        pending = Pending()
        for prefix in freed:
            pending.delete(Bucket.IPCACHE, ipcache_key(prefix))
        await self.flush(pending)
        return {"unreferenced": released}

    async def handle_lookup(self, payload: Any) -> dict[str, Any]:
        if isinstance(payload, dict) and isinstance(payload.get("ids"), list):
            return {"labels": await self.labels_of(payload["ids"])}
        sets = self.parse_label_sets(payload)
        keys = [ls.canonical() for ls in sets]
        misses = [k for k in keys if k not in self.cache]
        if misses:
            async with self.db.unit_of_work() as uow:
                self.cache.update(await self.allocator.lookup(uow.session, misses))
        reserved = {ls.canonical(): i for ls in sets if (i := reserved_id_for(ls)) is not None}
        return {"ids": [reserved.get(k, self.cache.get(k)) for k in keys]}

    async def labels_of(self, ids: Sequence[Any]) -> list[list[str] | None]:
        reserved = {int(k): v["labels"] for k, v in reserved_identity_values().items()}
        out: list[list[str] | None] = []
        async with self.db.unit_of_work() as uow:
            for ident in ids:
                if not isinstance(ident, int):
                    raise BadRequest("ids", "expected integers")
                if ident in reserved:
                    out.append(reserved[ident])
                    continue
                row = await self.allocator.get(uow.session, ident)
                out.append(None if row is None else row.labels)
        return out

    # --- background ------------------------------------------------------------------------

    async def collect_garbage(self) -> None:
        """Delete identities unreferenced for the grace period, on every replica (idempotent)."""
        interval = max(1.0, self.allocator.grace / 4)
        while True:
            await asyncio.sleep(interval)
            gone = await run_in_transaction(self.db, self.allocator.collect_garbage)
            if gone:
                stale = {k for k, v in self.cache.items() if v in set(gone)}
                for key in stale:
                    del self.cache[key]
                pending = Pending()
                for ident in gone:
                    pending.delete(Bucket.IDENTITIES, str(ident))
                await self.flush(pending)

    async def watch_identities(self) -> None:
        """Forget cached lookups of identities another replica deleted."""
        async for ev in self.kvs[Bucket.IDENTITIES].watch():
            if ev.deleted:
                gone = int(ev.key) if ev.key.isdigit() else -1
                for key in [k for k, v in self.cache.items() if v == gone]:
                    del self.cache[key]

    # --- REST views -----------------------------------------------------------------------

    async def list_identities(self, _request: web.Request) -> web.Response:
        return web.json_response(await self.identity_list())

    async def identity_list(self) -> list[dict[str, Any]]:
        async with self.db.unit_of_work() as uow:
            rows = await self.allocator.list_all(uow.session)
        out = list(reserved_identity_values().values())
        out += [identity_value(r.id, r.labels) | {"refcount": r.refcount} for r in rows]
        return out

    async def get_identity(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        if not raw.isdigit():
            raise field_problem(422, "id", f"{raw!r} is not an identity number")
        (labels,) = await self.labels_of([int(raw)])
        if labels is None:
            raise field_problem(404, "id", f"identity {raw} not found")
        return web.json_response(identity_value(int(raw), labels))

    async def list_endpoints(self, _request: web.Request) -> web.Response:
        async with self.db.unit_of_work() as uow:
            records = await AddressRepository(uow.session, self.ipam, self.slots).list_endpoints()
        return web.json_response(records)

    async def list_ipcache(self, _request: web.Request) -> web.Response:
        async with self.db.unit_of_work() as uow:
            addresses = AddressRepository(uow.session, self.ipam, self.slots)
            records = await addresses.list_endpoints()
            prefixes = await addresses.list_prefixes()
        rows = [ipcache_value(ip, r["identity"], r["node"]) for r in records for ip in r["ips"]]
        rows += [ipcache_value(prefix, ident, "") for prefix, ident in prefixes]
        return web.json_response(sorted(rows, key=lambda r: r["prefix"]))


def _kind_routes(app: web.Application, handlers: ResourceHandlers) -> None:
    """``/v1/namespaces`` and ``/v1/pods``: the generic resource routes under their own names."""

    def fixed(kind: str, namespace: str | None = None) -> Any:
        async def list_(request: web.Request) -> web.Response:
            request.match_info["kind"] = kind
            return await handlers.list(request)

        async def one(request: web.Request, method: str) -> web.Response:
            request.match_info["kind"] = kind
            if namespace is not None:
                request.match_info["namespace"] = namespace
            return await (handlers.get if method == "GET" else handlers.delete)(request)

        async def get(request: web.Request) -> web.Response:
            return await one(request, "GET")

        async def delete(request: web.Request) -> web.Response:
            return await one(request, "DELETE")

        return list_, get, delete

    ns_list, ns_get, ns_delete = fixed("Namespace", "_")
    route(app, "POST", "/v1/namespaces", handlers.apply, summary="apply a Namespace")
    route(app, "GET", "/v1/namespaces", ns_list, summary="list namespaces")
    route(app, "GET", "/v1/namespaces/{name}", ns_get, summary="read a namespace")
    route(
        app,
        "DELETE",
        "/v1/namespaces/{name}",
        ns_delete,
        summary="delete a namespace, its pods, and their identity references",
    )
    pod_list, pod_get, pod_delete = fixed("Pod")
    route(app, "POST", "/v1/pods", handlers.apply, summary="apply a Pod")
    route(app, "GET", "/v1/pods", pod_list, summary="list pods", query=("namespace",))
    route(app, "GET", "/v1/pods/{namespace}/{name}", pod_get, summary="read a pod")
    route(app, "DELETE", "/v1/pods/{namespace}/{name}", pod_delete, summary="delete a pod")


async def require_tables(ctx: ServiceContext) -> None:
    """Refuse to start on an unmigrated database, saying how to fix it (the runner does not
    migrate; ``ciliate up`` and ``ciliate db upgrade`` do)."""
    missing = await missing_tables(ctx.database)
    if missing:
        message = (
            f"identity: the database lacks the tables {', '.join(missing)}; "
            "run `ciliate db upgrade` (or start the stack with `ciliate up`, which migrates)"
        )
        ctx.log.error(message)
        raise SchemaMissing(message)


async def setup(ctx: ServiceContext) -> None:
    await require_tables(ctx)
    env = ctx.settings.extra | dict(os.environ)
    ipam = Ipam(
        env.get("CILIATE_CLUSTER_CIDR", DEFAULT_CLUSTER_CIDR),
        int(env.get("CILIATE_NODE_CIDR_PREFIX", str(DEFAULT_NODE_PREFIX))),
    )
    patterns = [p for p in env.get("CILIATE_LABEL_FILTER", "").split(",") if p]
    label_filter = LabelFilter.from_patterns(patterns) if patterns else None
    grace = float(env.get("CILIATE_IDENTITY_GC_GRACE", str(DEFAULT_GRACE_SECONDS)))
    service = IdentityService(ctx, ipam, label_filter, grace)
    await service.open_buckets()
    await service.resync()

    async def after_commit() -> None:
        await service.flush()

    handlers = ResourceHandlers(
        ctx.database,
        owned_kinds("identity"),
        on_apply=service.on_apply,
        on_delete=service.on_delete,
        after_commit=after_commit,
        group_commit=GROUP_COMMIT,
    )
    handlers.register(ctx.app)
    _kind_routes(ctx.app, handlers)
    route(
        ctx.app,
        "GET",
        "/v1/identities",
        service.list_identities,
        summary="identities, reserved included",
    )
    route(ctx.app, "GET", "/v1/identities/{id}", service.get_identity, summary="one identity")
    route(ctx.app, "GET", "/v1/endpoints", service.list_endpoints, summary="endpoints")
    route(ctx.app, "GET", "/v1/ipcache", service.list_ipcache, summary="IP -> identity")
    queue = queue_group("identity")
    await ctx.bus.serve(IDENTITY_ALLOCATE, service.handle_allocate, queue=queue)
    await ctx.bus.serve(IDENTITY_RELEASE, service.handle_release, queue=queue)
    await ctx.bus.serve(IDENTITY_LOOKUP, service.handle_lookup, queue=queue)
    ctx.spawn(service.collect_garbage(), name="identity-gc")
    ctx.spawn(service.watch_identities(), name="identity-watch")


SPEC = ServiceSpec(name="identity", setup=setup, uses_db=True, per_node=False)
