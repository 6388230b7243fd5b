"""Pod addresses: a /24 (configurable) of the cluster CIDR per node, the next free host for a
pod that has none, and a given address honoured as is.

Pure: the callers pass in which subnets and addresses are already taken (the SQL tables hold
them, with UNIQUE constraints deciding between replicas).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterator
from dataclasses import dataclass

DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
DEFAULT_NODE_PREFIX = 24
RESERVED_HOSTS = 1
"""Hosts at the start of each node subnet kept back: .1 is the node's router (cilium_host)."""


class IpamError(ValueError):
    """An address cannot be given out; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Ipam:
    cluster_cidr: str = DEFAULT_CLUSTER_CIDR
    node_prefix: int = DEFAULT_NODE_PREFIX

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.cluster_cidr)
        if not net.prefixlen < self.node_prefix <= net.max_prefixlen:
            raise ValueError(
                f"node prefix /{self.node_prefix} must be longer than the cluster CIDR {net}"
            )

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.cluster_cidr)

    def node_subnets(self) -> Iterator[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return self.network.subnets(new_prefix=self.node_prefix)

    def next_node_cidr(self, taken: Collection[str]) -> str:
        """The first node subnet not yet assigned to a node."""
        for subnet in self.node_subnets():
            if str(subnet) not in taken:
                return str(subnet)
        raise IpamError("spec.nodeName", f"no free /{self.node_prefix} left in {self.network}")

    def contains(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in self.network

    def node_cidr_of(self, ip: str) -> str | None:
        """The node subnet an address falls in, or None outside the cluster CIDR."""
        addr = ipaddress.ip_address(ip)
        if addr not in self.network:
            return None
        return str(ipaddress.ip_network(f"{addr}/{self.node_prefix}", strict=False))

    def next_address(self, node_cidr: str, taken: Collection[str], skip: int = 0) -> str:
        """The ``skip``-th free host address of a node subnet (skip lets a retry move on)."""
        subnet = ipaddress.ip_network(node_cidr)
        for index, host in enumerate(subnet.hosts()):
            if index < RESERVED_HOSTS:
                continue
            text = str(host)
            if text not in taken:
                if skip == 0:
                    return text
                skip -= 1
        raise IpamError("status.podIP", f"no free address left in {node_cidr}")


def parse_ip(text: str, field: str = "status.podIP") -> str:
    """Normalise an address; IpamError naming ``field`` if it is not one."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise IpamError(field, f"{text!r} is not an IP address") from None


def host_prefix(ip: str) -> str:
    """``10.244.1.5`` -> ``10.244.1.5/32`` (``/128`` for IPv6)."""
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"
