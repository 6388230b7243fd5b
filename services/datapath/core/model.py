"""Map keys and values as plain frozen data, the vocabulary shared by planner, loader and CLI.

The byte layouts live next to the C in ``services/datapath/maps.py``; these are the meanings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag, StrEnum

from ciliate.flows.tables import PolicyMatchType, TrafficDirection


class EnforcementMode(StrEnum):
    """Cilium's ``--enable-policy``: default enforces where a policy selects the endpoint."""

    DEFAULT = "default"
    ALWAYS = "always"
    NEVER = "never"


class EndpointFlag(IntFlag):
    """Bits of the endpoint map value's ``flags`` (same numbers in the C)."""

    NONE = 0
    ENFORCE_INGRESS = 1
    ENFORCE_EGRESS = 2
    AUDIT = 4


class Proto(IntEnum):
    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    SCTP = 132


PORT_PROTOCOLS: tuple[Proto, ...] = (Proto.TCP, Proto.UDP, Proto.SCTP)
"""Protocols that have ports: a port rule with protocol "any" expands to these."""

DIRECTION_BY_NAME: dict[str, TrafficDirection] = {
    "ingress": TrafficDirection.INGRESS,
    "egress": TrafficDirection.EGRESS,
}


@dataclass(frozen=True, order=True)
class IPCacheKey:
    """An IPv4 prefix; the map is an LPM trie so /32 pod entries beat CIDR entries."""

    ip: str
    prefixlen: int


@dataclass(frozen=True)
class EndpointValue:
    endpoint_id: int
    identity: int
    flags: EndpointFlag


@dataclass(frozen=True, order=True)
class PolicyKey:
    """One policy-map key: local identity, direction, peer (0 = any), proto (0 = any), port block.

    ``port_prefixlen`` 16 is one port, 0 any port, in between a power-of-two aligned block.
    """

    local_identity: int
    direction: TrafficDirection
    peer: int
    proto: int
    port: int
    port_prefixlen: int

    @property
    def lpm_prefixlen(self) -> int:
        """Bits of the LPM key that must match: identities and direction always, then L4."""
        if self.proto == Proto.ANY:
            return FIXED_POLICY_BITS
        return FIXED_POLICY_BITS + 8 + self.port_prefixlen

    def covers_port(self, port: int) -> bool:
        if self.port_prefixlen == 0:
            return True
        shift = 16 - self.port_prefixlen
        return (port >> shift) == (self.port >> shift)


FIXED_POLICY_BITS = 32 + 32 + 8
"""local identity (32) + peer identity (32) + direction (8) in the LPM key."""
POLICY_KEY_BITS = FIXED_POLICY_BITS + 8 + 16


@dataclass(frozen=True)
class PolicyValue:
    deny: bool
    proxy_port: int
    match_type: PolicyMatchType


@dataclass(frozen=True)
class CTEntry:
    """A conntrack entry as read back from the map (addresses dotted, ports host order)."""

    saddr: str
    daddr: str
    sport: int
    dport: int
    proto: int
    direction: TrafficDirection
    last_seen_ns: int
    created_ns: int
    packets: int
    bytes: int
    local_identity: int
    peer_identity: int
    flags: int
