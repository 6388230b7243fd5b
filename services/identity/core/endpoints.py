"""Endpoint records and the exact KV payloads other services read (see the shared contracts).

KV keys cannot hold ``/``: endpoints are keyed ``<namespace>.<name>`` and ipcache prefixes with
``/`` written as ``_``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.identity.core.allocator import reserved_identities
from services.identity.core.ipam import host_prefix

ENDPOINT_ID_MIN = 1
ENDPOINT_ID_MAX = 65535
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class NamedPort:
    name: str
    port: int
    protocol: str = "TCP"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "protocol": self.protocol}


def container_ports(containers: Iterable[Mapping[str, Any]]) -> list[NamedPort]:
    """The container ports of a pod spec; named ports are what ``toPorts`` names resolve to."""
    ports: list[NamedPort] = []
    for container in containers:
        for port in container.get("ports") or ():
            ports.append(
                NamedPort(
                    name=str(port.get("name") or ""),
                    port=int(port["containerPort"]),
                    protocol=str(port.get("protocol") or "TCP").upper(),
                )
            )
    return ports


def next_endpoint_id(taken: Collection[int], skip: int = 0, start: int = ENDPOINT_ID_MIN) -> int:
    """The lowest free endpoint id (``skip`` moves past ids a racing replica took). ``start``:
    every id below it is known taken, so the search begins there (not O(ids taken) per pod)."""
    for ident in range(max(start, ENDPOINT_ID_MIN), ENDPOINT_ID_MAX + 1):
        if ident not in taken:
            if skip == 0:
                return ident
            skip -= 1
    raise RuntimeError("endpoint ids exhausted")


@dataclass(frozen=True)
class Endpoint:
    """One pod as the datapath and policy see it."""

    id: int
    namespace: str
    name: str
    labels: tuple[str, ...]
    identity: int
    ips: tuple[str, ...]
    node: str
    ports: tuple[NamedPort, ...] = ()
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True
    images: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return endpoint_key(self.namespace, self.name)

    def kv_value(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "name": self.name,
            "labels": sorted(self.labels),
            "identity": self.identity,
            "ips": list(self.ips),
            "node": self.node,
            "ports": [p.as_dict() for p in self.ports],
            "pod_labels": dict(self.pod_labels),
            "ready": self.ready,
            "images": list(self.images),
        }

    def ipcache_entries(self) -> dict[str, dict[str, Any]]:
        return {ipcache_key(ip): ipcache_value(ip, self.identity, self.node) for ip in self.ips}


def endpoint_key(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


def identity_value(ident: int, labels: Sequence[str]) -> dict[str, Any]:
    return {"id": ident, "labels": sorted(labels)}


def ipcache_key(ip_or_prefix: str) -> str:
    """An address is keyed as itself, a prefix with ``/`` written ``_``."""
    return ip_or_prefix.replace("/", "_")


def ipcache_value(ip_or_prefix: str, ident: int, node: str) -> dict[str, Any]:
    prefix = ip_or_prefix if "/" in ip_or_prefix else host_prefix(ip_or_prefix)
    return {"prefix": prefix, "identity": ident, "node": node}


def reserved_identity_values() -> dict[str, dict[str, Any]]:
    """KV ``identities`` entries for the reserved identities, published at start."""
    return {str(i): identity_value(i, labels) for i, labels in reserved_identities().items()}
