"""Host-local pod address allocation for the CNI agent: one address per container ID.

Like the reference ``host-local`` plugin: the node owns a pod CIDR, an ADD for a container that
already holds an address gets the same one back (the runtime retries ADD), a DEL frees it, and
the state is a plain mapping the agent persists between restarts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping


class IpamExhausted(RuntimeError):
    """Every address of the node's pod CIDR is in use."""


class HostLocalIpam:
    def __init__(self, cidr: str, allocated: Mapping[str, str] | None = None) -> None:
        self.network = ipaddress.ip_network(cidr)
        self.by_container: dict[str, str] = dict(allocated or {})
        for ip in self.by_container.values():
            if ipaddress.ip_address(ip) not in self.network:
                raise ValueError(f"{ip} is outside the pod CIDR {cidr}")
        self._next = 0

    def allocate(self, container_id: str) -> str:
        """The container's address, choosing the next free one round-robin (fresh addresses
        first, so a just-freed address is not handed to the next pod at once)."""
        held = self.by_container.get(container_id)
        if held is not None:
            return held
        used = set(self.by_container.values())
        hosts = list(self.network.hosts()) if self.network.num_addresses > 2 else list(
            self.network)
        for step in range(len(hosts)):
            candidate = str(hosts[(self._next + step) % len(hosts)])
            if candidate not in used:
                self._next = (self._next + step + 1) % len(hosts)
                self.by_container[container_id] = candidate
                return candidate
        raise IpamExhausted(f"no free address in {self.network}")

    def release(self, container_id: str) -> str | None:
        return self.by_container.pop(container_id, None)

    def address_of(self, container_id: str) -> str | None:
        return self.by_container.get(container_id)
