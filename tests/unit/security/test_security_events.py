"""Kernel records -> Tetragon JSON and compact lines; the process cache's LRU and GC."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.security.core.events import EventBuilder, HookInfo, PolicyInfo, compact
from services.security.core.process_cache import (
    Process,
    ProcessCache,
    exec_id,
    parse_cmdline,
    parse_proc_stat,
)
from services.security.core.spec import ArgSpec, ArgType
from services.security.core.wire import (
    EXEC_FIXED_SIZE,
    EXEC_TRUNC_ARGS,
    HDR_SIZE,
    TP_MAX_ARGS,
    TP_STR_LEN,
    EventKind,
    WireError,
    decode,
    decode_batch,
)


def header(kind: EventKind, pid: int, ktime: int, *, ppid: int = 0, aux: tuple[int, int, int]
           = (0, 0, 0), exec_ktime: int = 0) -> bytes:
    return struct.pack("<IIIIQQIIIIQ", kind, pid, pid, ppid, ktime, 77, 1000, *aux, exec_ktime)


def exec_bytes(pid: int, ppid: int, ktime: int, binary: str, argv: list[str], cwd: str,
               flags: int = 0) -> bytes:
    """An exec record as lifecycle.c submits it: only the used bytes, back to back."""
    args = b"\0".join(a.encode() for a in argv) + b"\0"
    out = header(EventKind.EXEC, pid, ktime, ppid=ppid, exec_ktime=ktime)
    raw_binary, raw_cwd = binary.encode(), cwd.encode()
    out += struct.pack("<HHHH", len(raw_binary), len(args), len(raw_cwd), flags)
    return out + raw_binary + args + raw_cwd


def test_exec_id_is_base64_node_ktime_pid() -> None:
    assert base64.b64decode(exec_id("n1", 123, 45)) == b"n1:123:45"


def test_exec_then_exit_with_sigkill_in_tetragon_shape() -> None:
    b = EventBuilder(node="n1", boot_wall_ns=1_700_000_000 * 10**9)
    parent = b.handle(decode(exec_bytes(10, 1, 100, "/bin/sh", ["sh"], "/")))
    assert parent[0]["process_exec"]["process"]["cwd"] == "/"
    [ev] = b.handle(decode(exec_bytes(11, 10, 200, "/tmp/x", ["/tmp/x", "a b", "c"],
                                      "/home/work")))
    proc = ev["process_exec"]["process"]
    assert proc["binary"] == "/tmp/x" and proc["arguments"] == '"a b" c'
    assert proc["cwd"] == "/home/work" and proc["pid"] == 11 and proc["uid"] == 1000
    assert proc["exec_id"] == exec_id("n1", 200, 11)
    assert proc["parent_exec_id"] == exec_id("n1", 100, 10)
    assert ev["process_exec"]["parent"]["binary"] == "/bin/sh"
    assert ev["node_name"] == "n1" and ev["time"].endswith("Z")
    [ex] = b.handle(decode(header(EventKind.EXIT, 11, 300, aux=(0, 9, 0), exec_ktime=200)))
    assert ex["process_exit"]["signal"] == "SIGKILL"
    assert ex["process_exit"]["process"]["exec_id"] == proc["exec_id"]
    assert compact(ex) == '💥 exit    n1 /tmp/x "a b" c SIGKILL'
    assert compact(ev) == '🚀 process n1 /tmp/x "a b" c'


def test_tracepoint_record_carries_policy_args_and_action() -> None:
    b = EventBuilder(node="n1", boot_wall_ns=0)
    b.policies[3] = PolicyInfo("watch", None, [HookInfo("syscalls", "sys_enter_openat", [
        ArgSpec(5, ArgType.INT, "int", size=8, signed=True),
        ArgSpec(6, ArgType.STRING, "string")])])
    b.handle(decode(exec_bytes(20, 1, 50, "/usr/bin/cat", ["cat"], "/")))
    ints = struct.pack(f"<{TP_MAX_ARGS}Q", (1 << 64) - 100, 0, 0, 0, 0)
    strs = b"".join(s.ljust(TP_STR_LEN, b"\0") for s in [b"", b"/etc/passwd", b"", b"", b""])
    raw = header(EventKind.TRACEPOINT, 20, 60, aux=(3, 0, 1), exec_ktime=50) + ints + strs
    [ev] = b.handle(decode(raw))
    tp = ev["process_tracepoint"]
    assert tp["policy_name"] == "watch" and tp["action"] == "KPROBE_ACTION_POST"
    assert tp["args"] == [{"long_arg": -100}, {"string_arg": "/etc/passwd"}]
    assert tp["process"]["binary"] == "/usr/bin/cat"
    assert compact(ev).startswith("⁉️ tracepoint n1 /usr/bin/cat syscalls sys_enter_openat")
    assert len(raw) == HDR_SIZE + 8 * TP_MAX_ARGS + TP_MAX_ARGS * TP_STR_LEN


def test_fork_without_exec_gets_its_own_exec_id_and_the_parents_binary() -> None:
    b = EventBuilder(node="n", boot_wall_ns=0)
    b.handle(decode(exec_bytes(30, 1, 10, "/bin/bash", ["bash"], "/")))
    assert b.handle(decode(header(EventKind.FORK, 31, 20, ppid=30, exec_ktime=10))) == []
    [ex] = b.handle(decode(header(EventKind.EXIT, 31, 30, aux=(3, 0, 0), exec_ktime=10)))
    assert ex["process_exit"]["process"]["binary"] == "/bin/bash"
    assert ex["process_exit"]["process"]["exec_id"] == exec_id("n", 20, 31)
    assert ex["process_exit"]["status"] == 3 and "signal" not in ex["process_exit"]


def make(i: int) -> Process:
    return Process(exec_id("n", i, i), i, 0, "/", "/b", "", i, "", "", "execve")


@given(st.integers(min_value=1, max_value=50), st.integers(min_value=0, max_value=120))
def test_cache_never_exceeds_capacity_and_keeps_the_newest(capacity: int, n: int) -> None:
    cache = ProcessCache(capacity=capacity)
    for i in range(n):
        cache.add(make(i))
    assert len(cache) == min(n, capacity)
    assert cache.evicted == max(0, n - capacity)
    if n:
        assert cache.by_pid(n - 1) is not None
    if n > capacity:
        assert cache.by_pid(0) is None


def test_gc_collects_exited_processes_after_the_delay_only() -> None:
    cache = ProcessCache(gc_delay_ns=100)
    cache.add(make(1))
    cache.add(make(2))
    cache.mark_exited(make(1).exec_id, now_ns=1000)
    assert cache.gc(now_ns=1050) == 0
    assert cache.gc(now_ns=1100) == 1
    assert cache.by_pid(1) is None and cache.by_pid(2) is not None


def test_proc_parsing_handles_parentheses_in_comm() -> None:
    stat = "42 (we(ird) name)) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0"
    parsed = parse_proc_stat(stat)
    assert (parsed.pid, parsed.comm, parsed.ppid, parsed.start_ticks) == (
        42, "we(ird) name)", 7, 12345)
    assert parse_cmdline(b"sleep\x0010\x00") == ["sleep", "10"]


@given(binary=st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s),
       argv=st.lists(st.text(max_size=20).filter(lambda s: "\0" not in s), min_size=1,
                     max_size=6),
       cwd=st.text(max_size=60).filter(lambda s: "\0" not in s))
def test_exec_record_round_trips_with_only_the_used_bytes(binary: str, argv: list[str],
                                                          cwd: str) -> None:
    raw = exec_bytes(5, 1, 9, binary, argv, "/" + cwd)
    record = decode(raw)
    assert len(raw) == EXEC_FIXED_SIZE + len(binary.encode()) + len(
        b"\0".join(a.encode() for a in argv)) + 1 + len(("/" + cwd).encode())
    assert record.binary == binary and record.args == argv  # type: ignore[union-attr]
    assert record.cwd == "/" + cwd  # type: ignore[union-attr]


def test_exec_record_cut_short_is_refused_and_counted_in_a_batch() -> None:
    good = exec_bytes(5, 1, 9, "/bin/true", ["true"], "/")
    with pytest.raises(WireError, match="lengths need"):
        decode(good[:-1])
    records, bad = decode_batch([good, good[:-1], b"\0" * 3])
    assert [r.header.pid for r in records] == [5] and bad == 2


def test_truncated_arguments_are_flagged_like_tetragon() -> None:
    b = EventBuilder(node="n", boot_wall_ns=0)
    [ev] = b.handle(decode(exec_bytes(7, 1, 5, "/bin/echo", ["echo", "x" * 30], "/",
                                      flags=EXEC_TRUNC_ARGS)))
    assert ev["process_exec"]["process"]["flags"] == "execve truncArgs"


def test_events_are_built_lazily_from_what_was_known_at_ingest() -> None:
    """ingest does no JSON work; to_json later still shows the parent as it was then."""
    b = EventBuilder(node="n", boot_wall_ns=10**18)
    b.ingest(decode(exec_bytes(40, 1, 10, "/bin/sh", ["sh"], "/")))
    event = b.ingest(decode(exec_bytes(41, 40, 20, "/bin/ls", ["ls", "-l"], "/srv")))
    assert event is not None and event.kind == "process_exec" and event.policy_name is None
    b.cache.gc(2 * 10**18)  # nothing exited: nothing collected
    doc = event.to_json()
    assert doc["process_exec"]["parent"]["binary"] == "/bin/sh"
    assert doc["process_exec"]["process"]["cwd"] == "/srv"
    assert doc["time"].startswith("2001-09-09T01:46:40.") and doc["time"].endswith("Z")
