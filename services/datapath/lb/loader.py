"""Compile, load and attach the LB programs (bcc), apply planned map writes, read LB events.

``LbDatapath`` is what the datapath agent calls: ``sync(lb_kv)`` with the whole KV `lb`
content after every change, ``attach_socket_lb(cgroup)`` once per node cgroup subtree,
``attach_nodeport(ifname, netns)`` on the node's bridge-facing interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcc import BPF, BPFAttachType  # type: ignore[import-not-found,unused-ignore]
from pyroute2.netlink.exceptions import NetlinkError

from ..core.events import EVENT_SIZE, EventDecoder
from ..loader import COMPILE_LOCK
from ..maps import PIN_ROOT
from ..netlink import ifindex, ipr_in, unpin
from .core.model import LbIndex, LbMap, LbOp, LbState, plan
from .maps import (
    U32C,
    U64C,
    BackendKeyC,
    LbMaps,
    NodeAddrValC,
    backend_val_c,
    ip_c,
    lb_pin_dir,
    revnat_val_c,
    svc_key_c,
    svc_val_c,
)

BPF_SOURCE = Path(__file__).with_name("bpf") / "lb.c"
SHARED_BPF_DIR = Path(__file__).parents[1] / "bpf"  # maps.h: struct flow_event
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
FILTER_PRIO = 2  # after the policy datapath's prio 1 filters when both share an interface
FILTER_HANDLE = 2

SOCK_PROGRAMS = (
    ("sock4_connect", BPFAttachType.CGROUP_INET4_CONNECT),
    ("sock4_sendmsg", BPFAttachType.CGROUP_UDP4_SENDMSG),
    ("sock4_recvmsg", BPFAttachType.CGROUP_UDP4_RECVMSG),
    ("sock4_getpeername", BPFAttachType.CGROUP_INET4_GETPEERNAME),
)
BPF_F_ALLOW_MULTI = 2
NODE_ADDR_LOCAL = 1
NODE_ADDR_REMOTE = 2


@dataclass(frozen=True)
class LbSizes:
    """Cilium's defaults (``bpf-lb-map-max`` 65536, ...); tests and benches shrink them."""

    services: int = 65536
    backends: int = 65536
    revnat: int = 65536
    sk_revnat: int = 262144
    affinity: int = 65536
    ct: int = 262144
    maglev_tables: int = 65536
    events_pages: int = 16


LB_MODES = ("snat", "dsr")
"""Cilium's ``bpf-lb-mode``: how NodePort/LB traffic reaches a backend on another node."""


def render_source(pins: Path, sizes: LbSizes, maglev_m: int, node_ip: str,
                  nodeport_range: tuple[int, int], mode: str = "snat") -> str:
    text = BPF_SOURCE.read_text()
    ip_be = int.from_bytes(ipaddress.IPv4Address(node_ip).packed, "little")
    for name, value in {
        "__PIN_DIR__": str(pins),
        "__MAGLEV_M__": str(maglev_m),
        "__NODE_IP__": f"{ip_be}u",
        "__NODEPORT_MIN__": str(nodeport_range[0]),
        "__NODEPORT_MAX__": str(nodeport_range[1]),
        "__DSR__": "1" if mode == "dsr" else "0",
        "__SERVICES_SIZE__": str(sizes.services),
        "__BACKENDS_SIZE__": str(sizes.backends),
        "__REVNAT_SIZE__": str(sizes.revnat),
        "__SK_REVNAT_SIZE__": str(sizes.sk_revnat),
        "__AFFINITY_SIZE__": str(sizes.affinity),
        "__CT_SIZE__": str(sizes.ct),
        "__MAGLEV_TABLES__": str(sizes.maglev_tables),
        "__EVENTS_PAGES__": str(sizes.events_pages),
    }.items():
        text = text.replace(name, value)
    return text


class LbDatapath:
    """One node's LB programs and pinned maps (``/sys/fs/bpf/ciliate/<node>-lb/``).

    A new instance for the same node reopens the pinned maps; ``sync`` diffs against what they
    hold, so a restarted agent converges without a flush. Attachments stay when it exits.
    """

    def __init__(self, node: str, pin_root: Path = PIN_ROOT, *, node_ip: str = "0.0.0.0",
                 maglev_m: int = 16381, sizes: LbSizes | None = None,
                 nodeport_range: tuple[int, int] = (30000, 32767),
                 mode: str = "snat") -> None:
        if mode not in LB_MODES:
            raise ValueError(f"LB mode {mode!r}: one of {', '.join(LB_MODES)}")
        self.node = node
        self.mode = mode
        self.node_ip = node_ip
        self.maglev_m = maglev_m
        self.sizes = sizes or LbSizes()
        self.pins = lb_pin_dir(node, pin_root)
        self.pins.mkdir(parents=True, exist_ok=True)
        src = render_source(self.pins, self.sizes, maglev_m, node_ip, nodeport_range, mode)
        with COMPILE_LOCK:  # clang inside bcc is not thread-safe (shared with the agent's)
            self.bpf = BPF(text=src.encode(), cflags=[f"-I{SHARED_BPF_DIR}"])
        self.sock_fns = {name: self.bpf.load_func(name.encode(), BPF.CGROUP_SOCK_ADDR,
                                                  attach_type=at)
                         for name, at in SOCK_PROGRAMS}
        self.fn_np_in = self.bpf.load_func(b"nodeport_ingress", BPF.SCHED_CLS)
        self.fn_np_out = self.bpf.load_func(b"nodeport_egress", BPF.SCHED_CLS)
        self.maps = LbMaps.open(self.pins, maglev_m)
        self.warnings: list[str] = []
        self.index = LbIndex(node, maglev_m)
        self._applied: LbState | None = None
        self.decoder = EventDecoder()
        self._ring_open = False
        self._cgroups: list[str] = []
        self._nodeports: list[tuple[str, str | None]] = []
        if node_ip != "0.0.0.0":
            self.set_node_addresses([node_ip], [])

    # --- attach ----------------------------------------------------------------------------

    def attach_socket_lb(self, cgroup_path: str | Path) -> None:
        """The four sock_addr programs on a cgroup v2 directory (multi: other programs on the
        same cgroup stay); every process below it is translated at connect time."""
        fd = os.open(str(cgroup_path), os.O_RDONLY)
        try:
            for name, at in SOCK_PROGRAMS:
                BPF.attach_func(self.sock_fns[name], fd, at, BPF_F_ALLOW_MULTI)
        finally:
            os.close(fd)
        self._cgroups.append(str(cgroup_path))

    def detach_socket_lb(self, cgroup_path: str | Path) -> None:
        fd = os.open(str(cgroup_path), os.O_RDONLY)
        try:
            for name, at in SOCK_PROGRAMS:
                with contextlib.suppress(Exception):  # not attached: nothing to undo
                    BPF.detach_func(self.sock_fns[name], fd, at)
        finally:
            os.close(fd)
        if str(cgroup_path) in self._cgroups:
            self._cgroups.remove(str(cgroup_path))

    def attach_nodeport(self, ifname: str, netns: str | None = None) -> None:
        """tc LB on the node's bridge-facing interface: ingress DNAT/SNAT, egress reverse NAT."""
        with ipr_in(netns) as ipr:
            idx = ifindex(ipr, ifname)
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != 17:  # EEXIST
                    raise
            for fn, parent in ((self.fn_np_in, TC_INGRESS), (self.fn_np_out, TC_EGRESS)):
                ipr.tc("replace-filter", "bpf", idx, FILTER_HANDLE, fd=fn.fd, name=fn.name,
                       parent=parent, prio=FILTER_PRIO, protocol=0x0003, classid=1,
                       direct_action=True)
        if (ifname, netns) not in self._nodeports:
            self._nodeports.append((ifname, netns))

    def detach_nodeport(self, ifname: str, netns: str | None = None) -> None:
        with ipr_in(netns) as ipr:
            try:
                idx = ifindex(ipr, ifname)
                for parent in (TC_INGRESS, TC_EGRESS):
                    ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=parent,
                           prio=FILTER_PRIO, protocol=0x0003)
            except (NetlinkError, LookupError):
                pass
        if (ifname, netns) in self._nodeports:
            self._nodeports.remove((ifname, netns))

    # --- maps ------------------------------------------------------------------------------

    def set_node_addresses(self, local: Iterable[str], remote: Iterable[str]) -> None:
        """Addresses that NodePort frontends (``0.0.0.0``) answer on: this node's own (socket
        and tc LB) and other nodes' (socket LB only, like Cilium's remote-node lookup)."""
        want = {a: NODE_ADDR_REMOTE for a in remote} | {a: NODE_ADDR_LOCAL for a in local}
        have = {str(ipaddress.IPv4Address(int(k.v).to_bytes(4, "little"))): int(v.kind)
                for k, v in self.maps.node_addrs.items()}
        for addr, kind in want.items():
            if have.get(addr) != kind:
                self.maps.node_addrs.put(_addr_key(addr), NodeAddrValC(kind))
        for addr in set(have) - set(want):
            self.maps.node_addrs.delete(_addr_key(addr))

    def sync(self, lb_kv: dict[str, dict[str, Any]]) -> int:
        """Make the maps hold what ``lb_kv`` (the whole KV `lb` content) says for this node;
        returns the number of map writes. The first call diffs against what the pinned maps
        hold (a restarted agent converges without a flush); later ones against what this
        instance wrote."""
        index = LbIndex(self.node, self.maglev_m)
        index.load(lb_kv)
        if self._applied is None:
            self._applied = self.maps.read_state(self.maglev_m, with_tables=False)
        n = self.apply(plan(self._applied, index.state))
        self.index = index
        self._applied = index.state
        self.warnings = [w for ws in index.warnings.values() for w in ws]
        return n

    def update(self, key: str, value: dict[str, Any] | None) -> int:
        """One KV `lb` event (``value`` None = deleted): only that Service's entries (or the
        Services using that table) are recomputed and written. Call ``sync`` once first."""
        if self._applied is None:
            raise RuntimeError("update() before the first sync()")
        n = self.apply(self.index.update(key, value))
        self._applied = self.index.state
        return n

    def apply(self, ops: Iterable[LbOp]) -> int:
        n = 0
        for op in ops:
            self._write(op)
            n += 1
        return n

    def _write(self, op: LbOp) -> None:
        m = self.maps
        if op.map is LbMap.SERVICES:
            if op.value is None:
                m.services.delete(svc_key_c(op.key))
            else:
                m.services.put(svc_key_c(op.key), svc_val_c(op.value))
        elif op.map is LbMap.BACKENDS:
            if op.value is None:
                m.backends.delete(BackendKeyC(op.key))
            else:
                m.backends.put(BackendKeyC(op.key), backend_val_c(op.value))
        elif op.map is LbMap.REVNAT:
            if op.value is None:
                m.revnat.delete(U32C(op.key))
            else:
                m.revnat.put(U32C(op.key), revnat_val_c(op.value))
        elif op.value is None:
            m.maglev.delete(U64C(op.key))
        else:
            m.maglev.put(U64C(op.key), m.maglev.val_type.from_buffer_copy(op.value))

    def affinity_flush(self) -> int:
        return sum(int(self.maps.affinity.delete(k)) for k in list(self.maps.affinity.keys()))

    def ct_entries(self) -> int:
        return sum(1 for _ in self.maps.ct.keys())  # noqa: SIM118

    # --- events ----------------------------------------------------------------------------

    def poll_events(self, timeout_ms: int = 0) -> list[dict[str, Any]]:
        """LB events since the last call, as the datapath's flow dicts (socket LB refusals:
        type TRACE_SOCK; tc drops: type DROP; both with drop reason 158)."""
        if not self._ring_open:
            self.bpf[b"lb_events"].open_ring_buffer(self._on_event)
            self._ring_open = True
        self.bpf.ring_buffer_poll(timeout_ms)
        flows = self.decoder.drain()
        for f in flows:
            f["node_name"] = self.node
        return flows

    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        self.decoder.feed(ctypes.string_at(data, min(size, EVENT_SIZE)))

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release this process's handles; attachments and pinned maps stay."""
        self.maps.close()
        self.bpf.cleanup()

    def destroy(self) -> None:
        """Detach from the cgroups and interfaces this instance attached, close and unpin
        every map."""
        for cg in list(self._cgroups):
            with contextlib.suppress(OSError):
                self.detach_socket_lb(cg)
        for ifname, netns in list(self._nodeports):
            with contextlib.suppress(OSError):
                self.detach_nodeport(ifname, netns)
        self.close()
        unpin(self.pins)


def _addr_key(addr: str) -> U32C:
    return U32C(int.from_bytes(ip_c(addr), "little"))


__all__ = ["LB_MODES", "LbDatapath", "LbSizes", "unpin"]
