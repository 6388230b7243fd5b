"""Small netlink and bpffs helpers shared by the agent's loaders (policy, LB, L7 redirect)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyroute2 import IPRoute


class ipr_in:
    """An IPRoute bound to a network namespace (None = ours), closed on exit."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.ipr: Any = None

    def __enter__(self) -> Any:
        self.ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self.ipr

    def __exit__(self, *exc: object) -> None:
        self.ipr.close()


def ifindex(ipr: Any, ifname: str) -> int:
    """The index of link ``ifname``; LookupError names it when it does not exist."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no link {ifname!r}")
    return int(found[0])


def unpin(pins: Path) -> None:
    """Remove a pin directory and the maps pinned in it (the node is gone)."""
    if pins.exists():
        for p in pins.iterdir():
            p.unlink()
        pins.rmdir()
