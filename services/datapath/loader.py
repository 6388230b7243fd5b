"""Compile, load and attach the datapath programs (the one module that imports bcc), write the
maps in planned order, collect conntrack garbage and read the event ring buffer.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from bcc import BPF  # type: ignore[import-not-found,unused-ignore]
from pyroute2.netlink.exceptions import NetlinkError

from .core.conntrack import ct_expired
from .core.events import EVENT_SIZE, EventDecoder
from .core.plan import DesiredState, MapName, MapOp
from .maps import (
    PIN_ROOT,
    EndpointKeyC,
    NodeMaps,
    _ip_bytes,
    endpoint_val_c,
    ipcache_key_c,
    pin_dir,
    policy_key_c,
    policy_val_c,
)
from .netlink import ifindex, ipr_in, unpin

BPF_DIR = Path(__file__).with_name("bpf")
"""The agent's BPF C; its headers (maps.h) are shared with the L7 redirect program."""
BPF_SOURCE = BPF_DIR / "datapath.c"

TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
FILTER_PRIO = 2
"""After the L7 redirect (services/datapath/proxy, prio 1), which must see a pod's packets
first; distinct priorities make the order independent of attach order."""
FILTER_HANDLE = 1
LEGACY_FILTER_PRIO = 1
"""Where agents before the L7 proxy wiring attached; removed on re-attach."""
COMPILE_LOCK = threading.Lock()
"""Held by every bcc compile in this process (datapath, L7 redirect, LB): clang/LLVM inside bcc
is not thread-safe, and in-process agents compile on their own worker threads."""
METRICS_SLOTS = 1024
"""Slots of ``cil_metrics``: drop reason (0 = forwarded) * 4 + direction."""


@dataclass(frozen=True)
class MapSizes:
    """Cilium's defaults; tests shrink them."""

    ct_tcp: int = 512 * 1024
    ct_any: int = 256 * 1024
    ipcache: int = 512 * 1024
    endpoints: int = 65535
    policy: int = 16384 * 64
    events_pages: int = 64


class MonitorAggregation(IntEnum):
    """Cilium's ``--monitor-aggregation`` levels that change what this datapath reports."""

    NONE = 0
    LOWEST = 1
    LOW = 2
    MEDIUM = 3
    MAXIMUM = 4


TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
TCP_FLAG_OPTIONS = {"none": 0, "all": 0xFF, "fin": TCP_FIN, "syn": TCP_SYN, "rst": TCP_RST,
                    "psh": TCP_PSH, "ack": TCP_ACK, "urg": TCP_URG, "ece": 0x40, "cwr": 0x80}
"""Names accepted by ``CILIATE_MONITOR_AGGREGATION_FLAGS`` (Cilium's option, comma-separated)."""


def parse_tcp_flags(text: str) -> int:
    """``"syn,fin,rst"`` -> the bit mask; unknown names raise ValueError."""
    bits = 0
    for name in filter(None, (p.strip().lower() for p in text.split(","))):
        if name not in TCP_FLAG_OPTIONS:
            raise ValueError(f"unknown TCP flag {name!r}; known: {', '.join(TCP_FLAG_OPTIONS)}")
        bits |= TCP_FLAG_OPTIONS[name]
    return bits


class PolicyVerdictLog(IntEnum):
    """Which new connections make a policy-verdict event (``CILIATE_POLICY_VERDICT_LOG``)."""

    NONE = 0
    DENIED = 1
    """Audited (would-be denied) ones; allowed ones only below medium aggregation."""
    ALL = 2


@dataclass(frozen=True)
class MonitorConfig:
    """Trace-event aggregation: Cilium's defaults are medium with a 5 s report interval."""

    aggregation: MonitorAggregation = MonitorAggregation.MEDIUM
    interval_s: int = 5
    policy_verdicts: PolicyVerdictLog = PolicyVerdictLog.DENIED
    flags: int = TCP_SYN | TCP_FIN | TCP_RST
    """TCP flags reported on their first appearance per connection side (medium)."""


def render_source(pins: Path, sizes: MapSizes, monitor: MonitorConfig | None = None) -> str:
    """Fill the placeholders of bpf/datapath.c."""
    text = BPF_SOURCE.read_text()
    mon = monitor or MonitorConfig()
    for name, value in {
        "__MONITOR_AGGREGATION__": str(int(mon.aggregation)),
        "__MONITOR_INTERVAL_S__": str(max(1, mon.interval_s)),
        "__POLICY_VERDICT_LOG__": str(int(mon.policy_verdicts)),
        "__MONITOR_FLAGS__": hex(mon.flags & 0xFF),
        "__PIN_DIR__": str(pins),
        "__CT_TCP_SIZE__": str(sizes.ct_tcp),
        "__CT_ANY_SIZE__": str(sizes.ct_any),
        "__IPCACHE_SIZE__": str(sizes.ipcache),
        "__ENDPOINTS_SIZE__": str(sizes.endpoints),
        "__POLICY_MAP_SIZE__": str(sizes.policy),
        "__EVENTS_PAGES__": str(sizes.events_pages),
    }.items():
        text = text.replace(name, value)
    return text


class Datapath:
    """One node's programs and maps. Compile once; attach to any number of host-side veths.

    Maps are pinned under ``/sys/fs/bpf/ciliate/<node>/``: a new Datapath for the same node
    reopens them with their contents, and re-attaching replaces the tc filters in place.
    """

    def __init__(self, node: str, *, sizes: MapSizes | None = None,
                 pin_root: Path = PIN_ROOT, monitor: MonitorConfig | None = None) -> None:
        self.node = node
        self.sizes = sizes or MapSizes()
        self.pins = pin_dir(node, pin_root)
        self.pins.mkdir(parents=True, exist_ok=True)
        with COMPILE_LOCK:  # clang/LLVM inside bcc is not thread-safe
            self.bpf = BPF(text=render_source(self.pins, self.sizes, monitor).encode(),
                           cflags=[f"-I{BPF_DIR}"])
        self.fn_from = self.bpf.load_func(b"from_container", BPF.SCHED_CLS)
        self.fn_to = self.bpf.load_func(b"to_container", BPF.SCHED_CLS)
        self.maps = NodeMaps.open(self.pins)
        self.applied = DesiredState()
        self.decoder = EventDecoder()
        self._ring_open = False
        self.ct_counts: dict[str, int] = {}
        """Entries left per conntrack map after the last GC (for map pressure)."""

    # --- attach ----------------------------------------------------------------------------

    def attach(self, ifname: str, netns: str | None = None) -> int:
        """clsact on ``ifname`` with both programs (replacing any older filters of ours);
        returns the interface's index (what the programs' events carry)."""
        with ipr_in(netns) as ipr:
            idx = ifindex(ipr, ifname)
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != 17:  # EEXIST: kept from an earlier agent
                    raise
            for fn, parent in ((self.fn_from, TC_INGRESS), (self.fn_to, TC_EGRESS)):
                ipr.tc("replace-filter", "bpf", idx, FILTER_HANDLE, fd=fn.fd, name=fn.name,
                       parent=parent, prio=FILTER_PRIO, protocol=0x0003, classid=1,
                       direct_action=True)
                try:  # an older agent's filter: the new one is in place, so no gap
                    ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=parent,
                           prio=LEGACY_FILTER_PRIO, protocol=0x0003)
                except NetlinkError as e:
                    if e.code not in (2, 22):  # ENOENT / EINVAL: nothing there
                        raise
        return idx

    def detach(self, ifname: str, netns: str | None = None) -> None:
        with ipr_in(netns) as ipr:
            try:
                idx = ifindex(ipr, ifname)
                ipr.tc("del", "clsact", idx)
            except (NetlinkError, LookupError):
                pass

    # --- maps ------------------------------------------------------------------------------

    def apply(self, ops: Iterable[MapOp]) -> int:
        """Write ops in the given (planned) order; returns how many were written."""
        n = 0
        for op in ops:
            self._write(op)
            n += 1
        return n

    def sync(self, desired: DesiredState) -> int:
        """Make the maps hold ``desired``; compared against what the maps hold now (so a
        restarted agent converges without first wiping)."""
        from .core.plan import plan

        current = self.read_state()
        n = self.apply(plan(current, desired))
        self.applied = desired
        return n

    def read_state(self) -> DesiredState:
        return DesiredState(
            ipcache=self.maps.ipcache_entries(),
            endpoints=self.maps.endpoint_entries(),
            policy={k: v for k, v, _, _ in self.maps.policy_entries()},
        )

    def _write(self, op: MapOp) -> None:
        if op.map is MapName.IPCACHE:
            from .maps import IPCacheValC

            if op.value is None:
                self.maps.ipcache.delete(ipcache_key_c(op.key))
            else:
                self.maps.ipcache.put(ipcache_key_c(op.key), IPCacheValC(int(op.value), 0))
        elif op.map is MapName.ENDPOINTS:
            key = EndpointKeyC(_ip_bytes(op.key))
            if op.value is None:
                self.maps.endpoints.delete(key)
            else:
                self.maps.endpoints.put(key, endpoint_val_c(op.value))
        else:
            pkey = policy_key_c(op.key)
            if op.value is None:
                self.maps.policy.delete(pkey)
            else:
                old = self.maps.policy.get(pkey)
                val = policy_val_c(op.value)
                if old is not None:  # keep the counters across an update
                    val.packets, val.bytes = old.packets, old.bytes
                self.maps.policy.put(pkey, val)

    # --- conntrack -------------------------------------------------------------------------

    def ct_gc(self, now_ns: int | None = None) -> int:
        """Delete entries idle past their lifetime; returns how many."""
        now = now_ns if now_ns is not None else time.monotonic_ns()
        removed = 0
        for name, m in (("cil_ct_tcp", self.maps.ct_tcp), ("cil_ct_any", self.maps.ct_any)):
            kept = 0
            for k, v in list(m.items()):
                if ct_expired(int(k.proto), int(v.flags), int(v.last_seen_ns), now):
                    removed += int(m.delete(k))
                else:
                    kept += 1
            self.ct_counts[name] = kept
        return removed

    def ct_flush(self) -> int:
        removed = 0
        for m in (self.maps.ct_tcp, self.maps.ct_any):
            for k in list(m.keys()):
                removed += int(m.delete(k))
        return removed

    # --- events ----------------------------------------------------------------------------

    def poll_events(self, timeout_ms: int = 0) -> list[dict[str, Any]]:
        """Flows decoded from the ring buffer since the last call."""
        if not self._ring_open:
            self.bpf[b"cil_events"].open_ring_buffer(self._on_event)
            self._ring_open = True
        self.bpf.ring_buffer_poll(timeout_ms)
        # Records written without a wake-up (the program wakes the reader once per batch) are
        # not reported by epoll: take whatever the ring holds after every poll.
        self.bpf.ring_buffer_consume()
        return self.decoder.drain()

    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        self.decoder.feed(ctypes.string_at(data, min(size, EVENT_SIZE)))

    def events_lost(self) -> int:
        """Events the ring buffer refused since this agent loaded the programs (all CPUs)."""
        return int(sum(self.bpf[b"cil_events_lost"][ctypes.c_int(0)]))

    def metrics(self) -> dict[tuple[int, int], tuple[int, int]]:
        """{(drop reason or 0 for forwarded, direction): (packets, bytes)}, summed over CPUs."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        table = self.bpf[b"cil_metrics"]
        for idx in range(METRICS_SLOTS):
            per_cpu = table[ctypes.c_int(idx)]
            packets = sum(int(v.packets) for v in per_cpu)
            if packets:
                out[(idx >> 2, idx & 3)] = (packets, sum(int(v.bytes) for v in per_cpu))
        return out

    def program_info(self) -> list[dict[str, Any]]:
        return [{"name": fn.name.decode(), "type": "sched_cls", "fd": fn.fd}
                for fn in (self.fn_from, self.fn_to)]

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release this process's handles; attached filters and pinned maps stay."""
        self.maps.close()
        self.bpf.cleanup()

    def destroy(self) -> None:
        """Close and unpin every map (the node is gone)."""
        self.close()
        unpin(self.pins)


EventCallback = Callable[[dict[str, Any]], None]
