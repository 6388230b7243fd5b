"""The one place that imports bcc: compile-and-load the lifecycle and policy programs, attach
their tracepoints, fill their maps and read their ring buffers.

Tracepoints are global, so every program checks that the current task is inside this agent's
cgroup subtree (``bpf_current_task_under_cgroup`` against a cgroup array holding the node's
directory) before anything but loads from the tracepoint record: each node of a dev cluster acts
only on its own processes.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ciliate.doctor.probes import MissingKernelFeature, kernel_features, require
from services.security.core.btf import resolve_offsets
from services.security.core.compile import (
    LIFECYCLE_OFFSETS,
    CompiledPolicy,
    compile_lifecycle,
    compile_policy,
    required_offsets,
)
from services.security.core.events import HookInfo, PolicyInfo
from services.security.core.spec import HookKind, PolicySpec, parse_resource
from services.security.core.wire import Record, decode_batch

TRACEFS = Path("/sys/kernel/tracing/events")
VMLINUX = Path("/sys/kernel/btf/vmlinux")
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")
PROCS_TABLE = "ciliate_procs"
"""The public map the lifecycle programs fill and the policy programs read."""
_INSTANCES = itertools.count(1)

__all__ = ["LoadedPolicy", "Loader", "MissingKernelFeature", "policy_key", "tracepoint_format"]


def policy_key(name: str, namespace: str | None) -> str:
    """How a policy is named in KV `tracingpolicies` and in ``Loader.policies``: ``name`` for a
    TracingPolicy, ``namespace.name`` for a TracingPolicyNamespaced (NATS keys hold no '/')."""
    return f"{namespace}.{name}" if namespace else name


def tracepoint_format(subsystem: str, event: str) -> str | None:
    """The tracefs format text of a tracepoint, or None when the kernel has no such event."""
    path = TRACEFS / subsystem / event / "format"
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


@cache
def btf_text() -> str:
    """The running kernel's BTF as bpftool's raw dump (read once per process)."""
    return subprocess.run(
        ["bpftool", "btf", "dump", "file", str(VMLINUX), "format", "raw"],
        check=True, capture_output=True, text=True,
    ).stdout


def _template(name: str) -> str:
    return resources.files("services.security").joinpath("bpf", name).read_text()


def boot_wall_ns() -> int:
    """Wall-clock ns at CLOCK_MONOTONIC 0, to turn bpf_ktime_get_ns() into event times."""
    return time.time_ns() - time.monotonic_ns()


@dataclass
class LoadedPolicy:
    spec: PolicySpec
    policy_id: int
    compiled: CompiledPolicy
    bpf: Any
    info: PolicyInfo


@dataclass
class Loader:
    cgroup_subtree: Path
    """The node's cgroup v2 directory; only tasks inside it are observed or enforced on."""
    on_record: Callable[[Record], None]
    on_policy: Callable[[LoadedPolicy], None] | None = None
    """Called with a policy once loaded and before it is attached: whoever interprets its
    records learns about it before the first one can arrive."""
    features: Any = None
    lost_records: int = 0
    policies: dict[str, LoadedPolicy] = field(default_factory=dict)
    _lifecycle: Any = None
    _next_id: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _poll_lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while polling and while a BPF object is torn down, so no poll reads freed maps."""
    _raw: list[bytes] = field(default_factory=list)
    """Records as read by the ring buffer callbacks; decoded together once the poll is done."""
    _held: list[Record] = field(default_factory=list)
    """Records stamped after the last poll's cut (see ``poll``)."""
    _lost_unloaded: int = 0
    _instance: int = field(default_factory=lambda: next(_INSTANCES))

    def _offsets(self, paths: Iterable[str]) -> dict[str, int]:
        wanted = list(paths)
        return resolve_offsets(btf_text(), wanted) if wanted else {}

    def _scope(self, bpf: Any) -> None:
        fd = os.open(self.cgroup_subtree, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bpf[b"node_cgroup"][0] = fd
        finally:
            os.close(fd)

    def _shared_names(self, text: str) -> str:
        """bcc keeps public tables in a process-wide registry that outlives cleanup(); a name
        of this loader's own keeps a second Loader in one process off a dead table."""
        return text.replace(PROCS_TABLE, f"{PROCS_TABLE}_{self._instance}")

    def _callback(self, _ctx: Any, data: Any, size: int) -> None:
        self._raw.append(ctypes.string_at(data, size))

    def start(self) -> None:
        """Load and attach the always-on process lifecycle programs."""
        from bcc import BPF

        for name in ("tracepoint", "ringbuf", "btf"):
            require(name, self.features)
        text = compile_lifecycle(_template("lifecycle.c"), _template("common.h"),
                                 self._offsets(LIFECYCLE_OFFSETS))
        bpf = BPF(text=self._shared_names(text).encode())
        self._scope(bpf)
        bpf[b"events"].open_ring_buffer(self._callback)
        self._lifecycle = bpf

    def check(self, spec: PolicySpec) -> None:
        """Refuse, before anything loads, a policy that needs what the kernel lacks."""
        features = self.features if self.features is not None else kernel_features()
        for name in spec.required_features:
            require(name, features)

    def validate(self, doc: Mapping[str, Any]) -> PolicySpec:
        """Everything load_policy checks, without loading: the spec against this node's
        tracepoint formats, the kernel features it needs, and the C compile of its selectors."""
        spec = parse_resource(doc, tracepoint_format)
        self.check(spec)
        compile_policy(spec, _template("policy.c"), _template("common.h"), 0,
                       self._offsets(required_offsets(spec)))
        return spec

    def load_policy(self, doc: Mapping[str, Any]) -> LoadedPolicy:
        """Validate, compile, check kernel features, then load and attach (all or nothing)."""
        from bcc import BPF

        if self._lifecycle is None:
            raise RuntimeError("start() the lifecycle programs before loading policies")
        spec = parse_resource(doc, tracepoint_format)
        self.check(spec)
        key = policy_key(spec.name, spec.namespace)
        if key in self.policies:
            self.unload_policy(key)
        policy_id = self._next_id
        self._next_id += 1
        compiled = compile_policy(spec, _template("policy.c"), _template("common.h"), policy_id,
                                  self._offsets(required_offsets(spec)))
        bpf = BPF(text=self._shared_names(compiled.c_text).encode())
        try:
            self._scope(bpf)
            for name, keys in compiled.maps.items():
                table = bpf[name.encode()]
                for raw in keys:
                    k = table.Key()
                    ctypes.memmove(ctypes.addressof(k), raw, len(raw))
                    table[k] = table.Leaf(1)
            bpf[b"events"].open_ring_buffer(self._callback)
            info = PolicyInfo(
                spec.name, spec.namespace,
                [HookInfo(h.subsystem, h.event, h.args) for h in spec.hooks],
            )
            loaded = LoadedPolicy(spec, policy_id, compiled, bpf, info)
            if self.on_policy is not None:
                self.on_policy(loaded)
            with self._lock:  # polled from here on: no record of it can wait unread
                self.policies[key] = loaded
            for att in compiled.attachments:
                if att.kind is not HookKind.TRACEPOINT:
                    raise MissingKernelFeature(att.kind.value)
                bpf.attach_tracepoint(tp=att.target.encode(), fn_name=att.function.encode())
        except BaseException:
            with self._lock:
                if key in self.policies and self.policies[key].bpf is bpf:
                    del self.policies[key]
            with self._poll_lock:
                bpf.cleanup()
            raise
        return loaded

    def set_allowed_cgroups(self, key: str, cgroup_ids: Iterable[int]) -> None:
        """For namespaced/pod-selected policies: the cgroup ids of the matching endpoints."""
        loaded = self.policies[key]
        if not loaded.compiled.restrict_cgroups:
            return
        table = loaded.bpf[b"allowed_cgroups"]
        wanted = set(cgroup_ids)
        present = {int(k.value) for k in table}
        for cg in wanted - present:  # add before removing: no window where a pod is unmatched
            table[table.Key(cg)] = table.Leaf(1)
        for cg in present - wanted:
            del table[table.Key(cg)]

    def unload_policy(self, name: str) -> bool:
        with self._lock:
            loaded = self.policies.pop(name, None)
        if loaded is None:
            return False
        with self._poll_lock:
            loaded.bpf.ring_buffer_consume()  # its last records go out with the next poll
            self._lost_unloaded += _lost_count(loaded.bpf)
            loaded.bpf.cleanup()
        return True

    def kernel_lost(self) -> int:
        """Records the kernel could not put in a full ring buffer, over every program so far."""
        with self._lock:
            objects = [p.bpf for p in self.policies.values()]
        if self._lifecycle is not None:
            objects.append(self._lifecycle)
        return self._lost_unloaded + sum(_lost_count(b) for b in objects)

    def poll(self, timeout_ms: int = 50) -> int:
        """Deliver pending records to on_record in time order; returns how many.

        The lifecycle programs wake the reader only every so many records (see WAKE_EVERY in
        lifecycle.c), so a poll usually returns after ``timeout_ms`` with a batch: the timeout
        is the longest an event waits in the kernel.

        Records of one process come through several ring buffers (exec and exit in the
        lifecycle one, policy hits in the policy's own), so draining them one after another can
        put a later record in an earlier batch. Hence a cut: the clock is read before draining,
        and a record stamped after it waits for the next poll. A record stamped before the cut
        had everything its task wrote earlier already in a buffer, so each batch is complete up
        to the cut and is delivered sorted by kernel time.
        """
        with self._poll_lock:
            if self._lifecycle is None:
                return 0
            self._lifecycle.ring_buffer_poll(timeout_ms)
            cut = time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC
            with self._lock:  # after the cut: any program that wrote before it is listed
                loaded = list(self.policies.values())
            for policy in loaded:
                policy.bpf.ring_buffer_consume()
            self._lifecycle.ring_buffer_consume()
            raw, self._raw = self._raw, []
            batch, bad = decode_batch(raw)
            batch.extend(self._held)
            batch.sort(key=_ktime)
            split = bisect.bisect_right(batch, cut, key=_ktime)
            batch, self._held = batch[:split], batch[split:]
        self.lost_records += bad
        for record in batch:
            self.on_record(record)
        return len(batch)

    def close(self) -> None:
        for name in list(self.policies):
            self.unload_policy(name)
        with self._poll_lock:
            if self._lifecycle is not None:
                self._lifecycle.cleanup()
                self._lifecycle = None


def _ktime(record: Record) -> int:
    return record.header.ktime


def _lost_count(bpf: Any) -> int:
    try:
        table = bpf[b"lost_records"]
    except KeyError:
        return 0
    return sum(int(v) for v in table.getvalue(table.Key(0)))


def cgroup_id(path: Path) -> int:
    """A cgroup v2 directory's id, as bpf_get_current_cgroup_id() reports it (its inode)."""
    return path.stat().st_ino
