"""Loads the L7 redirect program (bcc) and attaches it beside the datapath's tc programs.

The only bcc/pyroute2 user of the proxy package. ``ProxyDatapath(node)`` compiles
``bpf/redirect.c`` against the datapath's pinned maps of that node; ``setup_routing`` installs
the policy route that delivers marked packets locally (Cilium's ``fwmark 0x200/0xf00 lookup
2004`` with ``local default dev lo`` in table 2004); ``attach(ifname)`` adds the program to a
pod's host-veth tc ingress, ahead of the datapath program.
"""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
from pathlib import Path
from typing import Any

from bcc import BPF
from pyroute2 import NetlinkError

from services.datapath.loader import BPF_DIR, COMPILE_LOCK, MapSizes
from services.datapath.maps import PIN_ROOT, pin_dir
from services.datapath.netlink import ifindex, ipr_in

SOURCE = Path(__file__).with_name("bpf") / "redirect.c"
TC_INGRESS = "ffff:fff2"
FILTER_PRIO = 1
"""Ahead of the datapath's own filter (prio 2, services/datapath/loader.py), whatever the
attach order."""
FILTER_HANDLE = 0x1700
MARK_TO_PROXY = 0x0200
MARK_MASK = 0x0F00
ROUTE_TABLE = 2004
RULE_PRIORITY = 9
STAT_NAMES = ("redirected", "established", "no_proxy", "assign_failed")


def render_source(pins: Path, sizes: MapSizes) -> str:
    text = SOURCE.read_text()
    for name, value in {
        "__PIN_DIR__": str(pins),
        "__IPCACHE_SIZE__": str(sizes.ipcache),
        "__ENDPOINTS_SIZE__": str(sizes.endpoints),
        "__POLICY_MAP_SIZE__": str(sizes.policy),
        "__MARK__": hex(MARK_TO_PROXY),
    }.items():
        text = text.replace(name, value)
    return text


class ProxyDatapath:
    """The redirect program of one node (open the datapath's maps first: ``Datapath(node)``)."""

    def __init__(self, node: str, *, sizes: MapSizes | None = None,
                 pin_root: Path = PIN_ROOT) -> None:
        self.node = node
        self.pins = pin_dir(node, pin_root)
        if not (self.pins / "cil_policy").exists():
            raise FileNotFoundError(f"datapath maps of node {node!r} are not pinned at {self.pins}")
        with COMPILE_LOCK:
            self.bpf = BPF(text=render_source(self.pins, sizes or MapSizes()).encode(),
                           cflags=[f"-I{BPF_DIR}"])
        self.fn = self.bpf.load_func(b"to_proxy", BPF.SCHED_CLS)

    def setup_routing(self, netns: str | None = None) -> None:
        """fwmark rule + local default route so marked packets go to local sockets."""
        _ip(netns, "route", "replace", "local", "0.0.0.0/0", "dev", "lo",
            "table", str(ROUTE_TABLE))
        rule = ["fwmark", f"{MARK_TO_PROXY:#x}/{MARK_MASK:#x}", "lookup", str(ROUTE_TABLE),
                "priority", str(RULE_PRIORITY)]
        if f"lookup {ROUTE_TABLE}" not in _ip(netns, "rule", "show"):
            _ip(netns, "rule", "add", *rule)

    def teardown_routing(self, netns: str | None = None) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip(netns, "rule", "del", "fwmark", f"{MARK_TO_PROXY:#x}/{MARK_MASK:#x}",
                "lookup", str(ROUTE_TABLE), "priority", str(RULE_PRIORITY))
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip(netns, "route", "del", "local", "0.0.0.0/0", "dev", "lo",
                "table", str(ROUTE_TABLE))

    def attach(self, ifname: str, netns: str | None = None) -> None:
        """Add the redirect on ``ifname``'s tc ingress (after the datapath attached its own)."""
        with ipr_in(netns) as ipr:
            idx = ifindex(ipr, ifname)
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != 17:
                    raise
            ipr.tc("replace-filter", "bpf", idx, FILTER_HANDLE, fd=self.fn.fd, name=self.fn.name,
                   parent=TC_INGRESS, prio=FILTER_PRIO, protocol=0x0003, classid=1,
                   direct_action=True)

    def detach(self, ifname: str, netns: str | None = None) -> None:
        with ipr_in(netns) as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return
            with contextlib.suppress(NetlinkError):
                ipr.tc("del-filter", "bpf", found[0], FILTER_HANDLE, parent=TC_INGRESS,
                       prio=FILTER_PRIO, protocol=0x0003)

    def stats(self) -> dict[str, int]:
        table: Any = self.bpf[b"cil_proxy_stats"]
        out: dict[str, int] = {}
        for slot, name in enumerate(STAT_NAMES):
            values = table[ctypes.c_int(slot)]
            out[name] = int(sum(int(v) for v in values))
        return out

    def close(self) -> None:
        self.bpf.cleanup()


def _ip(netns: str | None, *args: str) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
