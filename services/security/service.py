"""Wires the security agent: TracingPolicy objects through the generic resource REST (validated
against this node's kernel at the edge), KV `tracingpolicies` as the fan-out to every node's
agent, and the always-on process lifecycle published to ``process.<node>``.

Any replica may take a REST write; every node's agent loads every policy it sees in the KV. An
agent observes and enforces only inside its node's cgroup subtree
(``/sys/fs/cgroup/unified/ciliate/<node>/``); pods are its ``<namespace>.<name>`` children.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections import Counter as Counts
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from ciliate.api import Problem
from ciliate.api.app import REGISTRY_KEY
from ciliate.api.resources import ResourceHandlers, owned_kinds
from ciliate.bus import KV, BatchPublisher, Bucket, KVMirror
from ciliate.bus.subjects import process
from ciliate.config import Settings
from ciliate.devcluster import CGROUP_ROOT, cluster_salt, node_cgroup
from ciliate.doctor.probes import MissingKernelFeature
from ciliate.resources.base import Resource
from ciliate.runner import ServiceContext, ServiceSpec
from ciliate.store import ResourceRepository, StoredResource
from ciliate.store.database import UnitOfWork
from services.security.core.compile import CompileError
from services.security.core.events import Event, EventBuilder, rfc3339
from services.security.core.features import feature_field
from services.security.core.filters import EVENT_SET_NAMES
from services.security.core.pods import PodIndex, cgroup_path_in, names
from services.security.core.process_cache import (
    Process,
    exec_id,
    join_arguments,
    parse_cmdline,
    parse_proc_stat,
    parse_proc_uid,
)
from services.security.core.wire import Record
from services.security.exporter import Exporter
from services.security.loader import (
    CGROUP2_ROOT,
    LoadedPolicy,
    Loader,
    boot_wall_ns,
    policy_key,
)

POLICY_KINDS = ("TracingPolicy", "TracingPolicyNamespaced")
POLL_TIMEOUT_MS = 100
"""Longest a poll waits in its thread; bounds how long shutdown waits for it."""
SCAN_INTERVAL = 0.5
"""How often pod cgroup directories are re-listed (also on an unknown cgroup id)."""
GC_INTERVAL = 5.0
LOST_INTERVAL = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")


def doc_key(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    namespace = meta.get("namespace") if doc.get("kind") == "TracingPolicyNamespaced" else None
    return policy_key(str(meta.get("name", "")), namespace or None)


@dataclass
class Pending:
    """KV writes decided by a request; published once its transaction committed."""

    puts: dict[str, dict[str, Any]] = field(default_factory=dict)
    deletes: set[str] = field(default_factory=set)


_pending: contextvars.ContextVar[Pending | None] = contextvars.ContextVar(
    "security_pending", default=None
)


def _pending_now() -> Pending:
    current = _pending.get()
    if current is None:
        current = Pending()
        _pending.set(current)
    return current


class Metrics:
    """Tetragon's metric names, on the service's /metrics registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("tetragon_events_total", "Events published, by type", ["type"],
                              registry=registry)
        self.policy_events = Counter("tetragon_policy_events_total",
                                     "Policy events, by policy and hook", ["policy", "hook"],
                                     registry=registry)
        self.missed = Counter("tetragon_missed_events_total",
                              "Events lost: ring buffer full, undecodable or not published",
                              registry=registry)

    def count(self, events: Iterable[Event]) -> None:
        """One increment per label set per batch, not per event."""
        by_kind: Counts[str] = Counts()
        by_policy: Counts[tuple[str, str]] = Counts()
        for event in events:
            by_kind[event.kind] += 1
            hook = event.hook
            if event.policy is not None and hook is not None:
                by_policy[(event.policy.name, f"{hook.subsystem}/{hook.event}")] += 1
        for kind, n in by_kind.items():
            self.events.labels(EVENT_SET_NAMES.get(kind, kind.upper())).inc(n)
        for (policy, hook_name), n in by_policy.items():
            self.policy_events.labels(policy, hook_name).inc(n)


class SecurityAgent:
    def __init__(self, ctx: ServiceContext, subtree: Path, exporter: Exporter | None = None,
                 features: Any = None) -> None:
        self.ctx = ctx
        self.node = ctx.settings.node
        self.subtree = subtree
        self.exporter = exporter
        self.metrics = Metrics(ctx.app[REGISTRY_KEY])
        self.pods = PodIndex(self.node)
        self._pods_lock = threading.Lock()
        self._last_scan = 0.0
        self.builder = EventBuilder(self.node, boot_wall_ns(), pod_of=self._pod_of)
        self.loader = Loader(cgroup_subtree=subtree, on_record=self._on_record,
                             on_policy=self._on_policy, features=features)
        self.publisher = BatchPublisher(ctx.bus, process(self.node), source=self.node)
        self.active = False
        self.policy_docs: dict[str, dict[str, Any]] = {}
        self.policy_errors: dict[str, str] = {}
        self._policy_lock = asyncio.Lock()
        self._out: list[Event] = []
        self._lost_seen = 0
        self._last_lost_check = 0.0
        self._last_gc = 0.0
        self._stopping = threading.Event()
        self.kv: KV | None = None

    # --- edge validation and KV fan-out -----------------------------------------------------

    async def on_apply(self, _uow: UnitOfWork, resource: Resource, _old: StoredResource | None,
                       dry_run: bool) -> dict[str, Any]:
        doc = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            spec = await asyncio.to_thread(self.loader.validate, doc)
        except MissingKernelFeature as exc:
            raise Problem(422, str(exc), errors=[
                {"field": feature_field(doc, exc.name), "message": str(exc)}
            ]) from None
        except CompileError as exc:
            raise Problem(422, str(exc), errors=[{"field": "spec", "message": str(exc)}]) from None
        if not dry_run:
            pending = _pending_now()
            key = doc_key(doc)
            pending.deletes.discard(key)
            pending.puts[key] = doc
        return {"requiredFeatures": list(spec.required_features)}

    async def on_delete(self, _uow: UnitOfWork, stored: StoredResource) -> dict[str, Any]:
        pending = _pending_now()
        key = policy_key(stored.name, stored.namespace or None)
        pending.puts.pop(key, None)
        pending.deletes.add(key)
        return {}

    async def after_commit(self) -> None:
        pending = _pending.get()
        _pending.set(None)
        if pending is None or self.kv is None:
            return
        kv = self.kv
        await asyncio.gather(*(kv.put(k, v) for k, v in pending.puts.items()),
                             *(kv.delete(k) for k in pending.deletes))

    async def resync(self) -> None:
        """Make KV `tracingpolicies` equal the SQL state (after any restart of either).

        Keys are listed before SQL is read, so a policy another replica adds meanwhile is
        never deleted here."""
        assert self.kv is not None
        before = set(await self.kv.items())
        async with self.ctx.database.unit_of_work() as uow:
            repo = ResourceRepository(uow.session)
            stored = [s for kind in POLICY_KINDS for s in await repo.list(kind, None)]
        docs = {doc_key(d): d for d in (s.to_document() for s in stored)}
        await asyncio.gather(*(self.kv.put(k, v) for k, v in docs.items()),
                             *(self.kv.delete(k) for k in before - set(docs)))

    # --- loading what the KV holds ------------------------------------------------------------

    async def policy_changed(self, key: str, _old: Any, new: Any) -> None:
        async with self._policy_lock:
            if not self.active:
                return
            if new is None:
                self.policy_docs.pop(key, None)
                self.policy_errors.pop(key, None)
                old_loaded = self.loader.policies.get(key)
                if await asyncio.to_thread(self.loader.unload_policy, key) and old_loaded:
                    self.builder.policies.pop(old_loaded.policy_id, None)
                self._publish_status()
                return
            try:
                loaded = await asyncio.to_thread(self.loader.load_policy, new)
            except Exception as exc:  # this node cannot run it: report, keep running the rest
                self.ctx.log.error("policy %s not loaded on %s: %s", key, self.node, exc)
                self.policy_errors[key] = str(exc)
                self._publish_status()
                return
            self.builder.policies[loaded.policy_id] = loaded.info
            self.policy_docs[key] = new
            self.policy_errors.pop(key, None)
            self._restrict(key)
            self._publish_status()
            self.ctx.log.info("policy %s loaded on %s", key, self.node)

    def _restrict(self, key: str) -> None:
        loaded = self.loader.policies.get(key)
        if loaded is None or not loaded.compiled.restrict_cgroups:
            return
        with self._pods_lock:
            allowed = self.pods.allowed_cgroups(loaded.spec.namespace, loaded.spec.pod_selector)
        self.loader.set_allowed_cgroups(key, allowed)

    async def restrict_all(self) -> None:
        async with self._policy_lock:
            for key in list(self.loader.policies):
                self._restrict(key)

    def _publish_status(self) -> None:
        self.ctx.status["policies"] = {
            **{k: "loaded" for k in self.loader.policies},
            **{k: f"error: {e}" for k, e in self.policy_errors.items()},
        }

    # --- pods ---------------------------------------------------------------------------------

    async def endpoint_changed(self, key: str, _old: Any, new: Any) -> None:
        with self._pods_lock:
            changed = self.pods.set_endpoint(key, new)
        if changed:
            await self.restrict_all()

    def scan(self) -> bool:
        """List pod cgroup directories under the subtree; True when the set changed."""
        found: dict[str, int] = {}
        try:
            with os.scandir(self.subtree) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False) and names([entry.name]):
                        found[entry.name] = entry.inode()
        except FileNotFoundError:
            pass
        with self._pods_lock:
            self._last_scan = time.monotonic()
            return self.pods.set_cgroups(found)

    def _pod_of(self, cgroup_id: int) -> dict[str, Any] | None:
        with self._pods_lock:
            pod = self.pods.pod_of(cgroup_id)
            stale = time.monotonic() - self._last_scan > SCAN_INTERVAL / 5
        if pod is None and stale and cgroup_id != self._subtree_id and self.scan():
            with self._pods_lock:
                pod = self.pods.pod_of(cgroup_id)
        return pod

    async def watch_cgroups(self) -> None:
        while True:
            if await asyncio.to_thread(self.scan):
                await self.restrict_all()
            await asyncio.sleep(SCAN_INTERVAL)

    # --- the event pipeline -------------------------------------------------------------------

    def proc_walk(self, proc: Path = Path("/proc")) -> int:
        """Put processes already running in the subtree into the cache (Tetragon's procFS)."""
        relative = "/" + str(self.subtree.relative_to(CGROUP2_ROOT))
        added = 0
        for entry in sorted(proc.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0):
            if not entry.name.isdigit():
                continue
            try:
                cgroup_text = (entry / "cgroup").read_text()
                if not cgroup_path_in(relative, cgroup_text):
                    continue
                stat = parse_proc_stat((entry / "stat").read_text())
                uid = parse_proc_uid((entry / "status").read_text())
                argv = parse_cmdline((entry / "cmdline").read_bytes())
                binary = os.readlink(entry / "exe")
                cwd = os.readlink(entry / "cwd")
                path = next(ln[3:].strip() for ln in cgroup_text.splitlines()
                            if ln.startswith("0::"))
                cg = (CGROUP2_ROOT / path.lstrip("/")).stat().st_ino
            except (OSError, ValueError, IndexError, StopIteration):
                continue  # exited meanwhile, or a kernel thread
            ktime = stat.start_ticks * 10**9 // CLK_TCK
            parent = self.builder.cache.by_pid(stat.ppid)
            self.builder.cache.add(Process(
                exec_id=exec_id(self.node, ktime, stat.pid), pid=stat.pid, uid=uid, cwd=cwd,
                binary=binary, arguments=join_arguments(argv), ktime=ktime,
                start_time=rfc3339(self.builder.wall(ktime)),
                parent_exec_id=parent.exec_id if parent else "", flags="procFS",
                cgroup_id=cg, pod=self._pod_of(cg),
            ))
            added += 1
        return added

    def _on_policy(self, loaded: LoadedPolicy) -> None:
        self.builder.policies[loaded.policy_id] = loaded.info

    def _on_record(self, record: Record) -> None:
        event = self.builder.ingest(record)
        if event is not None:
            self._out.append(event)

    def drain(self, timeout_ms: int = POLL_TIMEOUT_MS) -> tuple[list[dict[str, Any]], int]:
        """One poll, in a worker thread: the batch's events counted, their JSON built once for
        the bus and the exporter; new losses."""
        self._out = []
        self.loader.poll(timeout_ms)
        batch, self._out = self._out, []
        self.metrics.count(batch)
        out = [event.to_json() for event in batch]
        if self.exporter is not None:
            for doc in out:
                self.exporter.write(doc)
        now = time.monotonic()
        lost = 0
        if now - self._last_lost_check >= LOST_INTERVAL or out:
            self._last_lost_check = now
            total = self.loader.kernel_lost() + self.loader.lost_records
            lost, self._lost_seen = total - self._lost_seen, total
        if now - self._last_gc >= GC_INTERVAL:
            self._last_gc = now
            self.builder.cache.gc(time.time_ns())
            if self.exporter is not None:
                self.exporter.flush()
        return out, lost

    async def run_events(self) -> None:
        """Poll in a thread (the bus loop never waits on BPF) and hand events to the batcher."""
        dropped_before = self.publisher.lost_total
        while not self._stopping.is_set():
            events, lost = await asyncio.to_thread(self.drain)
            for event in events:
                self.publisher.add(event)  # batches of max_batch go out as one message
            if lost:
                self.publisher.lost(lost)
            dropped = self.publisher.lost_total - dropped_before
            if dropped:
                self.metrics.missed.inc(dropped)
                dropped_before = self.publisher.lost_total

    # --- life cycle ---------------------------------------------------------------------------

    @property
    def _subtree_id(self) -> int:
        try:
            return self.subtree.stat().st_ino
        except OSError:
            return -1

    def start(self) -> None:
        """Create the subtree, load the lifecycle programs, learn the running processes."""
        self.subtree.mkdir(parents=True, exist_ok=True)
        self.loader.start()
        self.active = True
        self.scan()
        known = self.proc_walk()
        self.ctx.status["agent"] = {"cgroup": str(self.subtree), "procfs_processes": known}

    async def stop(self) -> None:
        self._stopping.set()
        async with self._policy_lock:
            self.active = False
            await asyncio.to_thread(self.loader.close)
        await self.publisher.stop()
        if self.exporter is not None:
            self.exporter.close()


AGENT_KEY = web.AppKey("security.agent", SecurityAgent)
"""The running agent, for in-process tests and benchmarks."""


def node_subtree(node: str, root: Path = CGROUP_ROOT) -> Path:
    return root / node


def agent_subtree(settings: Settings, env: Mapping[str, str]) -> Path:
    """The cgroup subtree this node's agent acts in: ``CILIATE_SECURITY_CGROUP_ROOT``/<node>
    when set; in dev mode the subtree the datapath agent puts this node's pods in (its name
    carries the dev cluster's salt); else the default root's <node>."""
    if "CILIATE_SECURITY_CGROUP_ROOT" in env:
        return node_subtree(settings.node, Path(env["CILIATE_SECURITY_CGROUP_ROOT"]))
    if settings.dev_mode:
        return node_cgroup(cluster_salt(settings), settings.node)
    return node_subtree(settings.node)


async def setup(ctx: ServiceContext) -> None:
    env = ctx.settings.extra | dict(os.environ)
    agent = SecurityAgent(ctx, agent_subtree(ctx.settings, env), Exporter.from_env(env))
    agent.kv = await ctx.bus.kv(Bucket.TRACINGPOLICIES)
    handlers = ResourceHandlers(ctx.database, owned_kinds("security"), on_apply=agent.on_apply,
                                on_delete=agent.on_delete, after_commit=agent.after_commit)
    handlers.register(ctx.app)
    await agent.resync()
    try:
        await asyncio.to_thread(agent.start)
    except Exception as exc:  # no BPF here: still serve validation and storage
        ctx.log.error("security agent inactive on %s: %s", ctx.settings.node, exc)
        ctx.status["agent"] = {"error": str(exc)}
        return
    agent.publisher.start()
    ctx.on_shutdown(agent.stop)
    endpoints = KVMirror(await ctx.bus.kv(Bucket.ENDPOINTS), agent.endpoint_changed)
    policies = KVMirror(agent.kv, agent.policy_changed)
    ctx.spawn(agent.run_events(), name="security-events")
    ctx.spawn(endpoints.run(), name="security-endpoints")
    ctx.spawn(agent.watch_cgroups(), name="security-cgroups")
    ctx.spawn(policies.run(), name="security-policies")
    ctx.app[AGENT_KEY] = agent


SPEC = ServiceSpec(name="security", setup=setup, uses_db=True, per_node=True)
