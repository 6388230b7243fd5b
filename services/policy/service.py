"""Wires the policy service: stored policies + KV identities/endpoints -> KV ``policy``.

Policies are stored through the generic resource REST (validated at the edge, 422 naming the
field, nothing stored on error). The compiled entries per local identity are published into KV
``policy`` as deltas: a put only for identities whose value changed, a delete for identities
that disappeared. See docs/policy.md for revisions, replicas, overflow and CIDR identities.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import nats.errors
import sqlalchemy as sa
from aiohttp import web

from ciliate.api import READINESS_KEY, field_problem
from ciliate.api.resources import ResourceHandlers, owned_kinds
from ciliate.bus import KV, Bucket, KVMirror, RequestFailed, RevisionConflict, codec
from ciliate.bus.subjects import IDENTITY_ALLOCATE
from ciliate.labels import CIDR_IDENTITY_BASE, CLUSTER_IDENTITY_MIN, LabelSet
from ciliate.policymap import build_value
from ciliate.resources.base import Resource, ResourceError
from ciliate.resources.registry import parse_resource
from ciliate.runner import ServiceContext, ServiceSpec
from ciliate.store import (
    Database,
    DatabaseUnavailable,
    ResourceRepository,
    StoredResource,
    resources,
)
from ciliate.store.database import UnitOfWork
from services.policy.core.compile import (
    DEFAULT_MAP_CAPACITY,
    IdentityWorld,
    PeerWork,
    PolicyEngine,
    cidr_of,
    cidr_prefixes,
)
from services.policy.core.diff import Actor, Probe, reachability_diff
from services.policy.core.kv import check_capacity, encode_policy, kv_key, splice_policy
from services.policy.core.spec import PROTOCOL_NUMBERS, PolicySet, normalize
from services.policy.core.world import PolicyResource

KINDS = owned_kinds("policy")
DEBOUNCE = 0.02
"""Seconds a burst of policy or named-port changes is coalesced before the next compile (an
isolated change runs at once). New identities are never held: a pod waits on its own map."""
PROPAGATE_CHUNK = 64
"""Locals given a new peer's entries between two looks at the event loop (~5 ms of compile)."""
DB_POLL = 1.0
"""Seconds between checks for policies another replica stored."""
ALLOCATE_TIMEOUT = 2.0
RETRY_MIN, RETRY_MAX = 0.5, 10.0
PUBLISH_CONCURRENCY = 16
"""Puts in flight at once (a value is ~16 bytes an entry, up to ~260 KB at 16,384 entries)."""
URGENT, BACKGROUND = 0, 1
"""Publish priorities: a new identity's own map before the peers' maps it changed."""

NamedPortMap = dict[tuple[str, int], frozenset[int]]


def identity_labels(value: Any) -> tuple[int, LabelSet] | None:
    """A KV ``identities`` value as (id, labels); None for a malformed one."""
    if not isinstance(value, dict) or not isinstance(value.get("id"), int):
        return None
    labels = value.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return None
    return int(value["id"]), LabelSet.from_strings(labels)


def endpoint_named_ports(value: Any) -> tuple[int, NamedPortMap] | None:
    """A KV ``endpoints`` value as (identity, named ports); None for a malformed one."""
    if not isinstance(value, dict) or not isinstance(value.get("identity"), int):
        return None
    out: NamedPortMap = {}
    for port in value.get("ports") or []:
        if not isinstance(port, dict) or not port.get("name"):
            continue
        proto = PROTOCOL_NUMBERS.get(str(port.get("protocol") or "TCP").upper())
        number = port.get("port")
        if proto and isinstance(number, int):
            key = (str(port["name"]), proto)
            out[key] = out.get(key, frozenset()) | {number}
    return int(value["identity"]), out


KEEP: dict[str, Any] = {}
"""Marker from ``_desired``: leave the key as it is (overflow with a previous value)."""


def strip_revision(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "revision"}
    return value


@dataclass(frozen=True)
class Published:
    """What a KV ``policy`` key holds, without keeping the (large) value: a digest of it
    (``revision`` left out), its ``revision`` field and the KV revision."""

    digest: bytes
    revision: int
    kv_revision: int

    @classmethod
    def of(cls, value: Any, kv_revision: int) -> Published:
        revision = value.get("revision", 0) if isinstance(value, dict) else 0
        return cls(digest(value), int(revision) if isinstance(revision, int) else 0, kv_revision)


def digest(value: Any) -> bytes:
    return hashlib.blake2b(codec.pack(strip_revision(value)), digest_size=16).digest()


class SequentialIds:
    """Provisional CIDR identities for a dry run (never published): above every known one."""

    def __init__(self, known: Mapping[str, int]) -> None:
        self.known = dict(known)
        self.next = max([CIDR_IDENTITY_BASE, *known.values()]) + 1

    def __call__(self, prefix: str) -> int:
        if prefix not in self.known:
            self.known[prefix] = self.next
            self.next += 1
        return self.known[prefix]


class PolicyService:
    """One replica: mirrors, the engine, and the publisher. Every replica compiles the same."""

    def __init__(self, ctx: ServiceContext, *, debounce: float = DEBOUNCE,
                 capacity: int = DEFAULT_MAP_CAPACITY, db_poll: float = DB_POLL) -> None:
        self.ctx = ctx
        self.db: Database = ctx.database
        self.debounce = debounce
        self.capacity = capacity
        self.db_poll = db_poll
        self.identities: dict[int, LabelSet] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.named_ports: dict[int, NamedPortMap] = {}
        self.cidr_ids: dict[str, int] = {}
        self.engine: PolicyEngine | None = None
        self.published: dict[str, Published] = {}
        self.overflows: dict[int, str] = {}
        self._pending_ids: dict[int, LabelSet | None] = {}
        self._pending_ports: set[int] = set()
        self._unpublished: set[int] = set()
        self._peer_work: dict[int, PeerWork] = {}
        self._queue: asyncio.PriorityQueue[tuple[int, int, int]] = asyncio.PriorityQueue()
        self._queued: dict[int, tuple[int, int]] = {}
        self._encoded: dict[int, dict[str, Any]] = {}
        """The last value built for each identity (without revision): the base a new peer's
        records are spliced into (see ``_desired``)."""
        self._splice: dict[int, set[int] | None] = {}
        """Identity -> the peers whose records changed since ``_encoded`` was built; None (or
        no entry) = something else changed, encode the whole map."""
        self._seq = 0
        self._inflight = 0
        self._urgent_busy = 0
        self._no_urgent = asyncio.Event()
        self._no_urgent.set()
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._compiled_once = False
        self._arrived: dict[int, float] = {}
        """perf_counter when a new identity came in, until its own map is written (stats)."""
        self._policies_dirty = True
        self._fingerprint: tuple[tuple[str, str, str, int], ...] | None = None
        self._wake = asyncio.Event()
        self._retry_delay = RETRY_MIN
        self._retry_handle: asyncio.TimerHandle | None = None
        self.ready = asyncio.Event()
        self.stats: dict[str, Any] = {"compiles": 0, "puts": 0, "deletes": 0, "settled": 0}
        self._policy_kv: KV | None = None

    # -- wiring ----------------------------------------------------------------------------

    async def start(self) -> None:
        ctx = self.ctx
        handlers = ResourceHandlers(self.db, KINDS, on_apply=self.on_apply,
                                    after_commit=self.after_commit)
        handlers.register(ctx.app)

        async def compiled() -> bool:
            return self.ready.is_set()

        ctx.app[READINESS_KEY]["policy"] = compiled
        self._policy_kv = await ctx.bus.kv(Bucket.POLICY)
        ident_mirror = KVMirror(await ctx.bus.kv(Bucket.IDENTITIES), self._on_identity)
        ep_mirror = KVMirror(await ctx.bus.kv(Bucket.ENDPOINTS), self._on_endpoint)
        policy_synced = asyncio.Event()
        ctx.spawn(ident_mirror.run(), name="mirror:identities")
        ctx.spawn(ep_mirror.run(), name="mirror:endpoints")
        ctx.spawn(self._watch_published(policy_synced), name="watch:policy")
        ctx.spawn(self._run(ident_mirror, ep_mirror, policy_synced), name="compile")
        ctx.spawn(self._poll_db(), name="poll:policies")
        for n in range(PUBLISH_CONCURRENCY):
            ctx.spawn(self._publish_worker(), name=f"publish:{n}")
        self._gc_started = 0.0
        gc.callbacks.append(self._gc_pause)

        async def forget_gc() -> None:
            if self._gc_pause in gc.callbacks:
                gc.callbacks.remove(self._gc_pause)

        ctx.on_shutdown(forget_gc)
        self._update_status()

    def _gc_pause(self, phase: str, info: dict[str, int]) -> None:
        """Longest collector pause (a new pod's map waits through it), in the status."""
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause = (time.perf_counter() - self._gc_started) * 1000
        if pause > self.stats.get("gc_pause_max_ms", 0.0):
            self.stats["gc_pause_max_ms"] = round(pause, 2)
        if info.get("generation") == 2:
            self.stats["gc_full"] = self.stats.get("gc_full", 0) + 1

    # -- inputs ----------------------------------------------------------------------------

    async def _on_identity(self, key: str, _old: Any, new: Any) -> None:
        if not key.isdigit():
            return
        ident = int(key)
        parsed = identity_labels(new) if new is not None else None
        if parsed is None:
            self._arrived.pop(ident, None)
            self.identities.pop(ident, None)
            self._pending_ids[ident] = None
        else:
            if ident not in self.identities and CLUSTER_IDENTITY_MIN <= ident < CIDR_IDENTITY_BASE:
                self._arrived[ident] = time.perf_counter()
            self.identities[ident] = parsed[1]
            self._pending_ids[ident] = parsed[1]
        self._wake.set()

    async def _on_endpoint(self, key: str, old: Any, new: Any) -> None:
        touched = {p[0] for p in (endpoint_named_ports(old), endpoint_named_ports(new)) if p}
        if isinstance(new, dict):
            self.endpoints[key] = new
        else:
            self.endpoints.pop(key, None)
        for ident in touched:
            merged: NamedPortMap = {}
            for ep in self.endpoints.values():
                parsed = endpoint_named_ports(ep)
                if parsed and parsed[0] == ident:
                    for name, numbers in parsed[1].items():
                        merged[name] = merged.get(name, frozenset()) | numbers
            if merged != self.named_ports.get(ident, {}):
                if merged:
                    self.named_ports[ident] = merged
                else:
                    self.named_ports.pop(ident, None)
                self._pending_ports.add(ident)
                self._wake.set()

    async def _watch_published(self, synced: asyncio.Event) -> None:
        """Read what KV ``policy`` holds at start (digest, revision and KV revision per key),
        so only changed maps are written. Then stop watching: the acknowledgements of our own
        puts keep the KV revisions current, and a key another replica wrote meanwhile is
        re-read when a put's expected revision loses (see ``_put``). A watch kept open would
        receive every value this service writes (~400 maps of ~22 KB per new pod) only to
        digest them again, and under sustained churn its backlog held them all (the RSS growth
        measured in docs/BENCHMARKS.md)."""
        assert self._policy_kv is not None
        seen: set[str] = set()
        watch = self._policy_kv.watch()
        try:
            async for ev in watch:
                if ev.resync:
                    seen = set()
                    continue
                if ev.initial_done:
                    break
                if ev.deleted:
                    self.published.pop(ev.key, None)
                    continue
                seen.add(ev.key)
                current = self.published.get(ev.key)
                if current is None or ev.revision > current.kv_revision:
                    self.published[ev.key] = Published.of(ev.value, ev.revision)
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
        for key in set(self.published) - seen:
            self.published.pop(key, None)
        synced.set()

    async def _poll_db(self) -> None:
        """Another replica may store a policy: notice it by the stored resource versions."""
        while True:
            await asyncio.sleep(self.db_poll)
            try:
                fingerprint = await self._read_fingerprint()
            except DatabaseUnavailable as exc:
                self.ctx.status["database"] = f"unavailable: {exc}"
                continue
            self.ctx.status.pop("database", None)
            if self._fingerprint is not None and fingerprint != self._fingerprint:
                self._policies_dirty = True
                self._wake.set()

    async def _read_fingerprint(self) -> tuple[tuple[str, str, str, int], ...]:
        query = sa.select(resources.c.kind, resources.c.namespace, resources.c.name,
                          resources.c.resource_version).where(resources.c.kind.in_(sorted(KINDS)))
        async with self.db.unit_of_work() as uow:
            rows = (await uow.session.execute(query)).all()
        return tuple(sorted((str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows))

    async def _stored_policies(self, uow: UnitOfWork) -> list[StoredResource]:
        repo = ResourceRepository(uow.session)
        return [item for kind in sorted(KINDS) for item in await repo.list(kind)]

    async def _load_policy_set(self) -> PolicySet:
        async with self.db.unit_of_work() as uow:
            stored = await self._stored_policies(uow)
        self._fingerprint = tuple(sorted(
            (s.kind, s.namespace, s.name, s.resource_version) for s in stored))
        parsed: list[PolicyResource] = []
        for item in stored:
            try:
                parsed.append(parse_resource(item.to_document()))  # type: ignore[arg-type]
            except ResourceError as exc:  # stored by an older version: skip it loudly
                self.ctx.log.error("stored %s %s/%s no longer validates: %s",
                                   item.kind, item.namespace, item.name, exc)
        return normalize(parsed)

    # -- CIDR identities -------------------------------------------------------------------

    def _known_cidrs(self) -> dict[str, int]:
        known = {c: i for i, labels in self.identities.items() if (c := cidr_of(labels))}
        return {**known, **self.cidr_ids}

    async def _ensure_cidr_ids(self, policy_set: PolicySet) -> bool:
        """Ask the identity service for the CIDR identities the policies need (and their
        ipcache prefixes, which only it writes). False (and a retry later) if it does not answer."""
        missing = sorted(cidr_prefixes(policy_set) - set(self._known_cidrs()))
        if not missing:
            self.ctx.status.pop("cidr_pending", None)
            return True
        payload = {"labels": [[f"cidr:{p}", "reserved:world"] for p in missing],
                   "prefixes": missing}
        try:
            reply = await self.ctx.bus.request(IDENTITY_ALLOCATE, payload,
                                               timeout=ALLOCATE_TIMEOUT)
            ids = reply.get("ids") if isinstance(reply, dict) else None
            if (not isinstance(ids, list) or len(ids) != len(missing)
                    or not all(isinstance(i, int) for i in ids)):
                raise RequestFailed(502, "ids", f"unexpected reply {reply!r}")
        except RequestFailed as exc:
            self.ctx.status["cidr_pending"] = {"prefixes": missing, "error": str(exc)}
            self.ctx.log.warning("CIDR identities for %d prefixes not allocated (%s); "
                                 "policy publication held, retrying", len(missing), exc)
            return False
        self.cidr_ids.update(zip(missing, ids, strict=True))
        self.ctx.status.pop("cidr_pending", None)
        return True

    def _cidr_id(self, prefix: str) -> int:
        return self._known_cidrs()[prefix]

    # -- the compile loop ------------------------------------------------------------------

    async def _run(self, ident_mirror: KVMirror, ep_mirror: KVMirror,
                   policy_synced: asyncio.Event) -> None:
        await asyncio.gather(ident_mirror.synced.wait(), ep_mirror.synced.wait(),
                             policy_synced.wait())
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._process()
            except DatabaseUnavailable as exc:
                self.ctx.status["database"] = f"unavailable: {exc}"
                self._policies_dirty = True
                self._retry_later()
            except Exception as exc:
                self.ctx.log.exception("policy compile failed")
                self.ctx.status["last_error"] = repr(exc)
                self._retry_later()
            self._update_status()
            if self._wake.is_set() and (self._policies_dirty or self._pending_ports):
                await asyncio.sleep(self.debounce)  # coalesce a burst of policy/port changes

    def _retry_later(self) -> None:
        if self._retry_handle is not None:
            return

        def fire() -> None:
            self._retry_handle = None
            self._wake.set()

        loop = asyncio.get_running_loop()
        self._retry_handle = loop.call_later(self._retry_delay, fire)
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)

    async def _process(self) -> None:
        started = time.perf_counter()
        touched, self._unpublished = self._unpublished, set()
        full = False
        if self._policies_dirty or self.engine is None:
            policy_set = await self._load_policy_set()
            self._policies_dirty = False
            if not await self._ensure_cidr_ids(policy_set):
                self._policies_dirty = True
                self._retry_later()
                return
            if self.engine is None:
                self._pending_ids.clear()
                self._pending_ports.clear()
                world = IdentityWorld(dict(self.identities), dict(self.named_ports))
                self.engine = PolicyEngine(policy_set, world, allocate_cidr=self._cidr_id,
                                           capacity=self.capacity)
                self.engine.compile_all()
                full = True
                # The compiled maps are millions of long-lived objects: out of the collector's
                # sight, a full collection does not walk them all (~100-200 ms) while a new
                # pod waits on its map.
                gc.collect()
                gc.freeze()
            else:
                touched |= set(self.engine.replace_policies(policy_set, self._cidr_id))
        engine = self.engine
        pending, self._pending_ids = self._pending_ids, {}
        fresh = {i for i, labels in pending.items()
                 if labels is not None and i not in engine.compiled}
        for ident, labels in sorted(pending.items()):
            current = engine.cache.identities.get(ident)
            if labels is None:
                if current is not None:
                    self._peer_work.pop(ident, None)
                    touched |= set(engine.remove_identity(ident))
                    touched.add(ident)
                continue
            if current == labels:
                continue
            self._peer_work.pop(ident, None)
            admitted = time.perf_counter()
            deltas, work = engine.admit_identity(ident, labels, self.named_ports.get(ident))
            self.stats["admit_ms"] = round((time.perf_counter() - admitted) * 1000, 2)
            touched |= set(deltas)
            if work.locals:
                self._peer_work[ident] = work
        ports, self._pending_ports = self._pending_ports, set()
        for ident in sorted(ports):
            touched |= set(engine.set_named_ports(ident, self.named_ports.get(ident, {})))
        if full:
            touched = set(engine.compiled) | {int(k) for k in self.published if k.isdigit()}
        self._mark(touched & fresh, URGENT)  # a new pod's own map first: it waits on it
        self._mark(touched - fresh, BACKGROUND)
        await self._propagate()
        self.stats["last_compile_ms"] = round((time.perf_counter() - started) * 1000, 2)
        self.stats["compiles"] += 1
        self.ctx.status.pop("last_error", None)
        self.ctx.status.pop("database", None)
        self._compiled_once = True
        self._check_drained()

    async def _propagate(self) -> None:
        """New identities' entries in the maps of the locals they are a peer of, in parts: the
        loop gets a look in between, and a newer identity (whose pod waits on its own map) is
        taken in before the rest. Maps changed here are published in the background."""
        assert self.engine is not None
        while self._peer_work:
            await self._no_urgent.wait()  # new pods' own maps are written first
            if self._pending_ids:
                self._wake.set()  # back after the newer identities
                return
            ident, work = next(iter(self._peer_work.items()))
            part = replace(work, locals=work.locals[:PROPAGATE_CHUNK])
            if len(work.locals) > PROPAGATE_CHUNK:
                self._peer_work[ident] = replace(work, locals=work.locals[PROPAGATE_CHUNK:])
            else:
                del self._peer_work[ident]
            self._mark(self.engine.propagate_identity(part), BACKGROUND, peer=ident)
            await asyncio.sleep(0)

    # -- publishing ------------------------------------------------------------------------

    def _desired(self, ident: int) -> dict[str, Any] | None:
        """The value (without revision) to publish for ``ident``; None = delete the key.

        On overflow the previous value is kept (as Cilium keeps an endpoint's last good policy
        when regeneration fails); an identity with no previous value gets a fail-closed marker:
        both directions enforced, no entries, ``overflow`` saying why.
        """
        assert self.engine is not None
        pol = self.engine.compiled.get(ident)
        if pol is None:
            self._encoded.pop(ident, None)
            self._splice.pop(ident, None)
            return None
        overflow = check_capacity(pol, self.capacity)
        key = kv_key(ident)
        if overflow is not None:
            self._encoded.pop(ident, None)
            self._splice.pop(ident, None)
            if ident not in self.overflows:
                self.ctx.log.error("policy map overflow: %s", overflow)
            self.overflows[ident] = str(overflow)
            if key in self.published:
                return KEEP
            marker = build_value(ident, {"ingress": True, "egress": True}, [])
            marker["overflow"] = {"entries": overflow.entries, "capacity": overflow.capacity}
            return marker
        self.overflows.pop(ident, None)
        peers = self._splice.pop(ident, None)
        base = self._encoded.get(ident)
        if peers and base is not None:
            value = splice_policy(pol, base, peers)
        else:
            value = encode_policy(pol, None)
        self._encoded[ident] = value
        return value

    def _mark(self, idents: Iterable[int], priority: int, peer: int | None = None) -> None:
        """Queue maps for publishing. A map queued again before a worker took it is written
        once (with the state of the moment it is written); a more urgent mark moves it up.
        ``peer``: only that peer's entries changed (its records are spliced into the last
        value instead of encoding the whole map)."""
        for ident in sorted(set(idents)):
            if peer is None:
                self._splice[ident] = None
            elif ident not in self._splice:
                self._splice[ident] = {peer} if ident in self._encoded else None
            else:
                peers = self._splice[ident]
                if peers is not None:
                    peers.add(peer)
            queued = self._queued.get(ident)
            if queued is not None and queued[0] <= priority:
                continue
            self._seq += 1
            if priority == URGENT:
                self._urgent_busy += 1
                self._no_urgent.clear()
            self._queued[ident] = (priority, self._seq)
            self._queue.put_nowait((priority, self._seq, ident))

    async def _publish_worker(self) -> None:
        """One of ``PUBLISH_CONCURRENCY`` writers: pipelined puts, urgent maps first."""
        while True:
            priority, seq, ident = await self._queue.get()
            if self._queued.get(ident) != (priority, seq):
                continue  # superseded by a more urgent mark
            del self._queued[ident]
            self._inflight += 1
            try:
                if priority != URGENT:  # no CPU for others while a new pod waits on its map
                    await self._no_urgent.wait()
                await self._publish_one(ident)
            except Exception as exc:  # keep the writer alive; the map is retried
                self.ctx.log.exception("policy %s not published", ident)
                self.ctx.status["last_error"] = repr(exc)
                self._unpublished.add(ident)
                self._retry_later()
            finally:
                self._inflight -= 1
                if priority == URGENT:
                    self._urgent_busy -= 1
                    if not self._urgent_busy:
                        self._no_urgent.set()
                self._check_drained()

    async def _publish_one(self, ident: int) -> None:
        key = kv_key(ident)
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        async with lock:  # one writer per key; the value is computed when it is written
            desired = self._desired(ident)
            try:
                if desired is None:
                    if key in self.published:
                        await self._delete(key)
                    return
                if desired is not KEEP:
                    await self._put(key, desired)
                arrived = self._arrived.pop(ident, None)
                if arrived is not None and self._compiled_once:
                    self.stats["own_map_ms"] = round((time.perf_counter() - arrived) * 1000, 2)
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                self._unpublished.add(ident)
                self.ctx.log.warning("policy %s not published (%s); retrying", key, exc)
                self._retry_later()

    @property
    def publish_pending(self) -> int:
        """Maps still to write, including those waiting on a new peer's entries."""
        waiting = sum(len(w.locals) for w in self._peer_work.values())
        return len(self._queued) + self._inflight + waiting

    def _check_drained(self) -> None:
        """Everything compiled is written: ready (the first time), and one more ``settled``."""
        if self._queued or self._inflight or self._peer_work or self._pending_ids:
            return
        if not self._compiled_once:
            return
        if not self._unpublished:
            self._retry_delay = RETRY_MIN
        self.ctx.status["unpublished"] = len(self._unpublished)
        self.stats["settled"] += 1
        # What a settled compile keeps is long-lived (the maps, their values): out of the
        # collector's sight too, or every full collection walks the entries new pods added
        # (~40 ms after 100 of them) while the next pod waits. Young cyclic garbage first.
        gc.collect(1)
        gc.freeze()
        self.ready.set()
        self._update_status()

    async def _put(self, key: str, body: dict[str, Any]) -> None:
        """Write only a changed value; the revision counts up per key; a racing replica that
        wrote the same entries wins harmlessly (expected-revision puts, re-read on conflict)."""
        kv = self._policy_kv
        assert kv is not None
        wanted = digest(body)
        for _ in range(5):
            current = self.published.get(key)
            if current is not None and current.digest == wanted:
                return
            revision = current.revision + 1 if current else 1
            value = {"identity": body["identity"], "revision": revision,
                     **{k: v for k, v in body.items() if k != "identity"}}
            try:
                kv_rev = await kv.put(key, value,
                                      expected_revision=current.kv_revision if current else 0)
            except RevisionConflict:
                entry = await kv.get(key)
                if entry is None:
                    self.published.pop(key, None)
                else:
                    self.published[key] = Published.of(entry.value, entry.revision)
                continue
            self.published[key] = Published(wanted, revision, kv_rev)
            self.stats["puts"] += 1
            return
        self.ctx.log.warning("policy %s: gave up after repeated revision conflicts", key)
        self._retry_later()

    async def _delete(self, key: str) -> None:
        assert self._policy_kv is not None
        await self._policy_kv.delete(key)
        self.published.pop(key, None)
        self.stats["deletes"] += 1

    def _update_status(self) -> None:
        status = self.ctx.status
        status["policies"] = len(self.engine.policies.rules) if self.engine else 0
        status["identities"] = len(self.identities)
        status["published"] = len(self.published)
        status["overflow"] = sorted(self.overflows.values())
        status["publish_pending"] = self.publish_pending
        status.update(self.stats)

    # -- REST hooks ------------------------------------------------------------------------

    async def after_commit(self) -> None:
        self._policies_dirty = True
        self._wake.set()

    async def on_apply(self, uow: UnitOfWork, resource: Resource, _old: StoredResource | None,
                       dry_run: bool) -> dict[str, Any]:
        try:
            normalize([resource])  # type: ignore[list-item]
        except (ValueError, KeyError) as exc:
            raise field_problem(422, "spec", str(exc)) from None
        if not dry_run:
            return {}
        return {"diff": await self.dry_run_diff(uow, resource)}

    async def dry_run_diff(self, uow: UnitOfWork, resource: Resource) -> list[str]:
        """Reachability before and after storing ``resource``, from the current identities."""
        ref = (resource.kind, resource.metadata.namespace or "", resource.metadata.name)
        others: list[PolicyResource] = []
        before_all: list[PolicyResource] = []
        for item in await self._stored_policies(uow):
            try:
                parsed = parse_resource(item.to_document())
            except ResourceError:
                continue
            before_all.append(parsed)  # type: ignore[arg-type]
            if (item.kind, item.namespace, item.name) != ref:
                others.append(parsed)  # type: ignore[arg-type]
        before_set = normalize(before_all)
        after_set = normalize([*others, resource])  # type: ignore[list-item]
        world = IdentityWorld(dict(self.identities), dict(self.named_ports))
        allocate = SequentialIds(self._known_cidrs())
        after_engine = PolicyEngine(before_set, world, allocate_cidr=allocate,
                                    capacity=self.capacity)
        after_engine.compiled = {}
        affected = sorted(after_engine.replace_policies(after_set, allocate))
        before_engine = PolicyEngine(before_set, world, allocate_cidr=allocate,
                                     capacity=self.capacity)
        before = {i: before_engine.compile_identity(i) for i in affected}
        after = {i: after_engine.compiled[i] for i in affected}
        actors = [Actor(f"{ep.get('namespace')}/{ep.get('name')}", int(ep["identity"]), True)
                  for ep in self.endpoints.values() if isinstance(ep.get("identity"), int)]
        cidrs = {**before_engine.ipcache, **after_engine.ipcache}
        actors += [Actor(prefix, ident, False) for prefix, ident in sorted(cidrs.items())]
        probes: set[Probe] = set()
        for ep in self.endpoints.values():
            for port in ep.get("ports") or []:
                proto = PROTOCOL_NUMBERS.get(str(port.get("protocol") or "TCP").upper())
                if proto and isinstance(port.get("port"), int):
                    probes.add((proto, int(port["port"])))
        return reachability_diff(before, after, actors, probes)


SERVICE_KEY: web.AppKey[PolicyService] = web.AppKey("ciliate.policy.service", PolicyService)
"""The running service object (tests and benchmarks read its stats)."""


CAPACITY_SETTING = "policy_map_capacity"
"""``Settings.extra`` key (or ``CILIATE_POLICY_MAP_CAPACITY``): entries allowed per identity."""


async def setup(ctx: ServiceContext) -> None:
    raw = ctx.settings.extra.get(CAPACITY_SETTING) or os.environ.get(
        "CILIATE_POLICY_MAP_CAPACITY", "")
    service = PolicyService(ctx, capacity=int(raw) if raw else DEFAULT_MAP_CAPACITY)
    ctx.app[SERVICE_KEY] = service
    await service.start()


SPEC = ServiceSpec(name="policy", setup=setup, uses_db=True)
