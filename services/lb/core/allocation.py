"""ClusterIP and NodePort ranges: what is inside, and a free value from them.

The SQL tables (primary keys on the address and on port/protocol) settle races between
replicas; these helpers only pick candidates and explain refusals.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection
from dataclasses import dataclass

DEFAULT_SERVICE_CIDR = "10.96.0.0/12"
DEFAULT_NODE_PORT_RANGE = (30000, 32767)


class RangeFull(RuntimeError):
    """No free value left in the range."""


@dataclass(frozen=True)
class ServiceRanges:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    node_ports: tuple[int, int] = DEFAULT_NODE_PORT_RANGE

    @classmethod
    def parse(cls, cidr: str = DEFAULT_SERVICE_CIDR, node_ports: str = "") -> ServiceRanges:
        """``node_ports`` as ``30000-32767`` (Kubernetes' ``--service-node-port-range``)."""
        network = ipaddress.ip_network(cidr, strict=True)
        ports = DEFAULT_NODE_PORT_RANGE
        if node_ports:
            low, _, high = node_ports.partition("-")
            ports = (int(low), int(high or low))
            if not 1 <= ports[0] <= ports[1] <= 65535:
                raise ValueError(f"node port range {node_ports!r} is not within 1-65535")
        return cls(network, ports)

    def ip_problem(self, address: str) -> str | None:
        """Why ``address`` cannot be a ClusterIP here, or None."""
        ip = ipaddress.ip_address(address)
        if ip not in self.cidr:
            return f"{address} is not in the service CIDR {self.cidr}"
        if self.cidr.num_addresses > 2 and ip in (self.cidr.network_address,
                                                  self.cidr.broadcast_address):
            return f"{address} is the network or broadcast address of {self.cidr}"
        return None

    def node_port_problem(self, port: int) -> str | None:
        low, high = self.node_ports
        if not low <= port <= high:
            return f"{port} is outside the node port range {low}-{high}"
        return None

    def pick_ip(self, taken: Collection[str], rng: random.Random) -> str:
        """A free address: random probes (the range is large), then a scan when it is crowded."""
        first = int(self.cidr.network_address) + 1
        last = int(self.cidr.broadcast_address) - 1
        size = last - first + 1
        if size <= 0:
            raise RangeFull(f"service CIDR {self.cidr} has no usable address")
        for _ in range(64):
            candidate = str(ipaddress.ip_address(first + rng.randrange(size)))
            if candidate not in taken:
                return candidate
        for value in range(first, last + 1):
            candidate = str(ipaddress.ip_address(value))
            if candidate not in taken:
                return candidate
        raise RangeFull(f"service CIDR {self.cidr} is full")

    def pick_node_port(self, taken: Collection[int], rng: random.Random) -> int:
        low, high = self.node_ports
        free = [p for p in range(low, high + 1) if p not in taken]
        if not free:
            raise RangeFull(f"node port range {low}-{high} is full")
        return free[rng.randrange(len(free))]
