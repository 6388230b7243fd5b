"""The process cache: what is known about each process, keyed by Tetragon's exec_id.

An LRU bounded at 65536 entries (Tetragon's default) plus garbage collection: an exited process
stays for ``gc_delay_ns`` so late events (a tracepoint record read after the exit record) still
find it, then is collected. Start-up knowledge comes from a /proc walk; parsing that text is pure
here, the reading is the caller's.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_CAPACITY = 65536
DEFAULT_GC_DELAY_NS = 30 * 10**9


def exec_id(node: str, ktime: int, pid: int) -> str:
    """Tetragon's exec_id: base64 of "node:ktime:pid"."""
    return base64.b64encode(f"{node}:{ktime}:{pid}".encode()).decode()


def join_arguments(argv: list[str]) -> str:
    """Tetragon's `arguments`: argv[1:] joined by spaces, an argument with spaces quoted."""
    return " ".join(f'"{a}"' if " " in a or not a else a for a in argv[1:])


@dataclass
class Process:
    exec_id: str
    pid: int
    uid: int
    cwd: str
    binary: str
    arguments: str
    ktime: int
    start_time: str
    parent_exec_id: str
    flags: str
    cgroup_id: int = 0
    pod: dict[str, Any] | None = None
    exited_at_ns: int | None = None
    refcnt: int = field(default=1)

    def to_json(self) -> dict[str, Any]:
        """Tetragon's `Process` message with proto field names (empty fields omitted)."""
        out: dict[str, Any] = {
            "exec_id": self.exec_id,
            "pid": self.pid,
            "uid": self.uid,
            "cwd": self.cwd,
            "binary": self.binary,
            "arguments": self.arguments,
            "flags": self.flags,
            "start_time": self.start_time,
            "parent_exec_id": self.parent_exec_id,
            "tid": self.pid,
        }
        if self.pod is not None:
            out["pod"] = self.pod
        return {k: v for k, v in out.items() if v not in ("", None)}


class ProcessCache:
    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, gc_delay_ns: int = DEFAULT_GC_DELAY_NS
    ) -> None:
        self.capacity = capacity
        self.gc_delay_ns = gc_delay_ns
        self._by_id: OrderedDict[str, Process] = OrderedDict()
        self._by_pid: dict[int, str] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, process: Process) -> None:
        self._by_id[process.exec_id] = process
        self._by_id.move_to_end(process.exec_id)
        self._by_pid[process.pid] = process.exec_id
        while len(self._by_id) > self.capacity:
            old_id, old = self._by_id.popitem(last=False)
            if self._by_pid.get(old.pid) == old_id:
                del self._by_pid[old.pid]
            self.evicted += 1

    def get(self, exec_id_: str) -> Process | None:
        proc = self._by_id.get(exec_id_)
        if proc is not None:
            self._by_id.move_to_end(exec_id_)
        return proc

    def by_pid(self, pid: int) -> Process | None:
        eid = self._by_pid.get(pid)
        return self.get(eid) if eid is not None else None

    def clone(self, parent: Process, child_exec_id: str, pid: int, ktime: int,
              start_time: str) -> Process:
        """A fork without exec: the child runs the parent's image under its own exec_id."""
        child = replace(parent, exec_id=child_exec_id, pid=pid, ktime=ktime,
                        start_time=start_time, parent_exec_id=parent.exec_id, flags="clone",
                        exited_at_ns=None)
        self.add(child)
        return child

    def mark_exited(self, exec_id_: str, now_ns: int) -> None:
        proc = self._by_id.get(exec_id_)
        if proc is not None:
            proc.exited_at_ns = now_ns

    def gc(self, now_ns: int) -> int:
        """Drop processes that exited more than gc_delay_ns ago; returns how many."""
        dead = [
            eid for eid, p in self._by_id.items()
            if p.exited_at_ns is not None and now_ns - p.exited_at_ns >= self.gc_delay_ns
        ]
        for eid in dead:
            proc = self._by_id.pop(eid)
            if self._by_pid.get(proc.pid) == eid:
                del self._by_pid[proc.pid]
        return len(dead)


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    start_ticks: int


def parse_proc_stat(text: str) -> ProcStat:
    """/proc/<pid>/stat: comm may hold spaces and parentheses, so split at the last ')'."""
    head, _, rest = text.rpartition(")")
    pid_text, _, comm = head.partition(" (")
    fields = rest.split()
    # fields[0] is state (field 3); ppid is field 4, starttime field 22.
    return ProcStat(int(pid_text), comm, int(fields[1]), int(fields[19]))


def parse_proc_uid(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return 0


def parse_cmdline(raw: bytes) -> list[str]:
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode(errors="replace") for p in parts]
