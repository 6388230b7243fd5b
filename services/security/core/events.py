"""Kernel records -> Tetragon's JSON events (GetEventsResponse with proto field names) and the
compact one-line format with Tetragon's symbols. Pure: the clock offset and pod lookup are given.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ciliate.process_events import compact, event_kind
from services.security.core.process_cache import (
    Process,
    ProcessCache,
    exec_id,
    join_arguments,
)
from services.security.core.spec import ACTION_CODES, ACTION_ENUM, ArgSpec, ArgType
from services.security.core.wire import (
    EXEC_TRUNC_ARGS,
    ExecRecord,
    ExitRecord,
    ForkRecord,
    Record,
    TracepointRecord,
)

__all__ = ["compact", "event_kind"]

ACTION_BY_CODE = {code: ACTION_ENUM[kind] for kind, code in ACTION_CODES.items()}

def signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


_last_second: list[Any] = [None, ""]
"""The last whole second formatted: events come in bursts within one second."""


def rfc3339(wall_ns: int) -> str:
    """Tetragon's time format: RFC 3339 with nanoseconds, UTC, 'Z'."""
    seconds, nanos = divmod(wall_ns, 10**9)
    last = _last_second
    if last[0] != seconds:
        last[1] = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        last[0] = seconds
    return f"{last[1]}.{nanos:09d}Z"


@dataclass(frozen=True)
class HookInfo:
    subsystem: str
    event: str
    args: Sequence[ArgSpec]


@dataclass(frozen=True)
class PolicyInfo:
    name: str
    namespace: str | None
    hooks: Sequence[HookInfo]


@dataclass(slots=True)
class Event:
    """One Tetragon event as references to what the builder knew when the record came in; the
    JSON is built only by ``to_json`` (when the event is published or exported)."""

    kind: str
    """Tetragon's event field: "process_exec", "process_exit", "process_tracepoint"."""
    node: str
    wall_ns: int
    process: Process
    parent: Process | None
    record: Record
    policy: PolicyInfo | None = None

    @property
    def policy_name(self) -> str | None:
        return self.policy.name if self.policy is not None else None

    @property
    def hook(self) -> HookInfo | None:
        if self.policy is None or not isinstance(self.record, TracepointRecord):
            return None
        return self.policy.hooks[self.record.hook_index]

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"process": self.process.to_json()}
        if self.parent is not None:
            body["parent"] = self.parent.to_json()
        record = self.record
        if isinstance(record, ExitRecord):
            if record.signal:
                body["signal"] = signal_name(record.signal)
            body["status"] = record.code
        elif isinstance(record, TracepointRecord):
            hook = self.hook
            assert hook is not None and self.policy is not None
            body.update({
                "subsys": hook.subsystem,
                "event": hook.event,
                "args": tracepoint_args(hook, record),
                "policy_name": self.policy.name,
                "action": ACTION_BY_CODE.get(record.action_code, "KPROBE_ACTION_UNKNOWN"),
            })
        return {self.kind: body, "node_name": self.node, "time": rfc3339(self.wall_ns)}


def tracepoint_args(hook: HookInfo, record: TracepointRecord) -> list[dict[str, Any]]:
    """The record's argument slots as Tetragon's typed `args` of the hook's spec."""
    args: list[dict[str, Any]] = []
    for slot, arg in enumerate(hook.args[: len(record.ints)]):
        if arg.type is ArgType.STRING:
            args.append({"string_arg": record.strs[slot]})
        else:
            value = record.ints[slot]
            if arg.signed and value >= 1 << 63:
                value -= 1 << 64
            key = "long_arg" if arg.size == 8 else "int_arg"
            if arg.size == 4 and arg.signed and value >= 1 << 31:
                value -= 1 << 32
            args.append({key: value})
        if arg.label:
            args[-1]["label"] = arg.label
    return args


@dataclass
class EventBuilder:
    node: str
    boot_wall_ns: int
    """Wall-clock time at ktime 0 (bpf_ktime_get_ns is CLOCK_MONOTONIC)."""
    cache: ProcessCache = field(default_factory=ProcessCache)
    pod_of: Callable[[int], dict[str, Any] | None] = lambda _cgroup_id: None
    policies: dict[int, PolicyInfo] = field(default_factory=dict)
    unknown_policy_records: int = 0

    def wall(self, ktime: int) -> int:
        return self.boot_wall_ns + ktime

    def _parent_id(self, ppid: int) -> str:
        parent = self.cache.by_pid(ppid)
        return parent.exec_id if parent is not None else ""

    def _unknown(self, pid: int, ktime: int, cgroup_id: int, uid: int) -> Process:
        """A process the cache never saw (started before us and missed by the /proc walk)."""
        proc = Process(
            exec_id=exec_id(self.node, ktime, pid), pid=pid, uid=uid, cwd="", binary="",
            arguments="", ktime=ktime, start_time=rfc3339(self.wall(ktime)),
            parent_exec_id="", flags="unknown", cgroup_id=cgroup_id, pod=self.pod_of(cgroup_id),
        )
        self.cache.add(proc)
        return proc

    def _process_for(self, pid: int, exec_ktime: int, ktime: int, cgroup_id: int,
                     uid: int) -> Process:
        if exec_ktime:
            found = self.cache.get(exec_id(self.node, exec_ktime, pid))
            if found is not None:
                return found
        found = self.cache.by_pid(pid)
        return found if found is not None else self._unknown(pid, exec_ktime or ktime,
                                                             cgroup_id, uid)

    def _event(self, kind: str, proc: Process, record: Record,
               policy: PolicyInfo | None = None) -> Event:
        parent = self.cache.get(proc.parent_exec_id) if proc.parent_exec_id else None
        return Event(kind, self.node, self.boot_wall_ns + record.header.ktime, proc, parent,
                     record, policy)

    def ingest(self, record: Record) -> Event | None:
        """Update the cache with one record; the event it produces (fork produces none)."""
        h = record.header
        if isinstance(record, ExecRecord):
            binary = record.binary
            if not binary.startswith("/") and record.cwd:
                binary = record.cwd.rstrip("/") + "/" + binary.removeprefix("./")
            flags = "execve truncArgs" if record.flags & EXEC_TRUNC_ARGS else "execve"
            proc = Process(
                exec_id=exec_id(self.node, h.exec_ktime, h.pid), pid=h.pid, uid=h.uid,
                cwd=record.cwd, binary=binary, arguments=join_arguments(record.args),
                ktime=h.exec_ktime, start_time=rfc3339(self.boot_wall_ns + h.exec_ktime),
                parent_exec_id=self._parent_id(h.ppid), flags=flags,
                cgroup_id=h.cgroup_id, pod=self.pod_of(h.cgroup_id),
            )
            self.cache.add(proc)
            return self._event("process_exec", proc, record)
        if isinstance(record, ForkRecord):
            parent = self.cache.by_pid(h.ppid)
            if parent is not None:
                self.cache.clone(parent, exec_id(self.node, h.ktime, h.pid), h.pid, h.ktime,
                                 rfc3339(self.wall(h.ktime)))
            return None
        if isinstance(record, ExitRecord):
            proc = self._process_for(h.pid, h.exec_ktime, h.ktime, h.cgroup_id, h.uid)
            self.cache.mark_exited(proc.exec_id, self.wall(h.ktime))
            return self._event("process_exit", proc, record)
        policy = self.policies.get(record.policy_id)
        if policy is None or record.hook_index >= len(policy.hooks):
            self.unknown_policy_records += 1
            return None
        proc = self._process_for(h.pid, h.exec_ktime, h.ktime, h.cgroup_id, h.uid)
        return self._event("process_tracepoint", proc, record, policy)

    def handle(self, record: Record) -> list[dict[str, Any]]:
        """``ingest`` with the event's JSON built at once (tests and one-off tools)."""
        event = self.ingest(record)
        return [] if event is None else [event.to_json()]
