"""The one place that imports bcc: compile-and-load the lifecycle and policy programs, attach
their tracepoints, fill their maps and read their ring buffers.

Tracepoints are global, so every program first checks that the current task is inside this
agent's cgroup subtree (``bpf_current_task_under_cgroup`` against a cgroup array holding the
node's directory): each node of a dev cluster acts only on its own processes.
"""

from __future__ import annotations

import ctypes
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
from services.security.core.wire import Record, WireError, decode

TRACEFS = Path("/sys/kernel/tracing/events")
VMLINUX = Path("/sys/kernel/btf/vmlinux")
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified")

__all__ = ["LoadedPolicy", "Loader", "MissingKernelFeature", "tracepoint_format"]


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
    features: Any = None
    lost_records: int = 0
    policies: dict[str, LoadedPolicy] = field(default_factory=dict)
    _lifecycle: Any = None
    _next_id: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _batch: list[Record] = field(default_factory=list)

    def _offsets(self, paths: Iterable[str]) -> dict[str, int]:
        wanted = list(paths)
        return resolve_offsets(btf_text(), wanted) if wanted else {}

    def _scope(self, bpf: Any) -> None:
        fd = os.open(self.cgroup_subtree, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bpf[b"node_cgroup"][0] = fd
        finally:
            os.close(fd)

    def _callback(self, _ctx: Any, data: Any, size: int) -> None:
        try:
            self._batch.append(decode(ctypes.string_at(data, size)))
        except WireError:
            self.lost_records += 1

    def start(self) -> None:
        """Load and attach the always-on process lifecycle programs."""
        from bcc import BPF

        for name in ("tracepoint", "ringbuf", "btf"):
            require(name, self.features)
        text = compile_lifecycle(_template("lifecycle.c"), _template("common.h"),
                                 self._offsets(LIFECYCLE_OFFSETS))
        bpf = BPF(text=text.encode())
        self._scope(bpf)
        bpf[b"events"].open_ring_buffer(self._callback)
        self._lifecycle = bpf

    def check(self, spec: PolicySpec) -> None:
        """Refuse, before anything loads, a policy that needs what the kernel lacks."""
        features = self.features if self.features is not None else kernel_features()
        for name in spec.required_features:
            require(name, features)

    def load_policy(self, doc: Mapping[str, Any]) -> LoadedPolicy:
        """Validate, compile, check kernel features, then load and attach (all or nothing)."""
        from bcc import BPF

        if self._lifecycle is None:
            raise RuntimeError("start() the lifecycle programs before loading policies")
        spec = parse_resource(doc, tracepoint_format)
        self.check(spec)
        if spec.name in self.policies:
            self.unload_policy(spec.name)
        policy_id = self._next_id
        self._next_id += 1
        compiled = compile_policy(spec, _template("policy.c"), _template("common.h"), policy_id,
                                  self._offsets(required_offsets(spec)))
        bpf = BPF(text=compiled.c_text.encode())
        try:
            self._scope(bpf)
            for name, keys in compiled.maps.items():
                table = bpf[name.encode()]
                for key in keys:
                    k = table.Key()
                    ctypes.memmove(ctypes.addressof(k), key, len(key))
                    table[k] = table.Leaf(1)
            for att in compiled.attachments:
                if att.kind is not HookKind.TRACEPOINT:
                    raise MissingKernelFeature(att.kind.value)
                bpf.attach_tracepoint(tp=att.target.encode(), fn_name=att.function.encode())
            bpf[b"events"].open_ring_buffer(self._callback)
        except BaseException:
            bpf.cleanup()
            raise
        info = PolicyInfo(
            spec.name, spec.namespace,
            [HookInfo(h.subsystem, h.event, h.args) for h in spec.hooks],
        )
        loaded = LoadedPolicy(spec, policy_id, compiled, bpf, info)
        with self._lock:
            self.policies[spec.name] = loaded
        return loaded

    def set_allowed_cgroups(self, name: str, cgroup_ids: Iterable[int]) -> None:
        """For namespaced/pod-selected policies: the cgroup ids of the matching endpoints."""
        loaded = self.policies[name]
        if not loaded.compiled.restrict_cgroups:
            return
        table = loaded.bpf[b"allowed_cgroups"]
        table.clear()
        for cg in cgroup_ids:
            table[table.Key(cg)] = table.Leaf(1)

    def unload_policy(self, name: str) -> bool:
        with self._lock:
            loaded = self.policies.pop(name, None)
        if loaded is None:
            return False
        loaded.bpf.cleanup()
        return True

    def poll(self, timeout_ms: int = 50) -> int:
        """Deliver pending records to on_record in time order; returns how many.

        Records of one process come through several ring buffers (exec in the lifecycle one,
        policy hits in the policy's own). Policy buffers are drained before the lifecycle buffer
        is drained again, so the exec behind any policy record is in the same batch; the batch
        is then delivered sorted by kernel time.
        """
        if self._lifecycle is None:
            return 0
        with self._lock:
            loaded = list(self.policies.values())
        self._lifecycle.ring_buffer_poll(timeout_ms)
        for policy in loaded:
            policy.bpf.ring_buffer_consume()
        self._lifecycle.ring_buffer_consume()
        batch, self._batch = self._batch, []
        batch.sort(key=lambda r: r.header.ktime)
        for record in batch:
            self.on_record(record)
        return len(batch)

    def close(self) -> None:
        for name in list(self.policies):
            self.unload_policy(name)
        if self._lifecycle is not None:
            self._lifecycle.cleanup()
            self._lifecycle = None


def cgroup_id(path: Path) -> int:
    """A cgroup v2 directory's id, as bpf_get_current_cgroup_id() reports it (its inode)."""
    return path.stat().st_ino
