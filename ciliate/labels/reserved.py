"""Cilium's reserved security identities, numbered and named as `cilium-dbg` shows them."""

from __future__ import annotations

from enum import IntEnum


class ReservedIdentity(IntEnum):
    UNKNOWN = 0
    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    KUBE_APISERVER = 7
    INGRESS = 8
    WORLD_IPV4 = 9
    WORLD_IPV6 = 10
    ENCRYPTED_OVERLAY = 11

    @property
    def label_name(self) -> str:
        """The name after ``reserved:`` (``remote-node``, ``world-ipv4``...)."""
        return self.name.lower().replace("_", "-")

    @property
    def label(self) -> str:
        return f"reserved:{self.label_name}"


RESERVED: tuple[ReservedIdentity, ...] = tuple(ReservedIdentity)

CLUSTER_IDENTITY_MIN = 256
CLUSTER_IDENTITY_MAX = 65535
CIDR_IDENTITY_BASE = 1 << 24
"""Local (CIDR) identities are allocated in the 1<<24 scope, as Cilium does."""


def reserved_by_name(name: str) -> ReservedIdentity:
    """``world`` or ``reserved:world`` -> ReservedIdentity.WORLD; KeyError if unknown."""
    bare = name.removeprefix("reserved:")
    for ident in RESERVED:
        if ident.label_name == bare:
            return ident
    raise KeyError(name)
