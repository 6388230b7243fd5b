"""Load-balancer vocabulary: frontends, backends and their states, as Cilium names them.

These are the values the ``lb`` KV bucket carries (see docs/lb.md); they are defined once here
and both the service and its CLI render from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any


class BackendState(StrEnum):
    """Cilium's backend states (``pkg/loadbalancer``): only ``active`` backends take new flows.

    ``terminating`` backends keep their established connections; ``quarantined`` (failed health
    checks) and ``maintenance`` (drained by an operator) get nothing new either.
    """

    ACTIVE = "active"
    TERMINATING = "terminating"
    QUARANTINED = "quarantined"
    MAINTENANCE = "maintenance"


class FrontendType(StrEnum):
    """The ``Service Type`` column of ``cilium-dbg service list``."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_IPS = "ExternalIPs"


class Scope(StrEnum):
    """Which backends a frontend may pick: all of them, or only those on the receiving node
    (externalTrafficPolicy / internalTrafficPolicy ``Local``)."""

    CLUSTER = "cluster"
    LOCAL = "local"


DEFAULT_WEIGHT = 100
"""Cilium's ``DefaultBackendWeight``: equal weights of 100 give Cilium's own tables."""

ANY_ADDRESS = "0.0.0.0"
"""Cilium's surrogate NodePort frontend: every address of the node that receives the packet."""


@dataclass(frozen=True, order=True)
class L3n4:
    """An address, port and protocol: what identifies a backend (and a frontend) cluster-wide."""

    address: str
    port: int
    protocol: str

    @property
    def key(self) -> str:
        """``10.0.0.1:80/TCP`` (IPv6 in brackets): the id-table key and the CLI spelling."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Frontend:
    address: str
    port: int
    protocol: str
    type: FrontendType
    scope: Scope
    port_name: str

    @property
    def l3n4(self) -> L3n4:
        return L3n4(self.address, self.port, self.protocol)

    @cached_property
    def id_key(self) -> str:
        """Frontend ids are per address, port, protocol and scope, as Cilium's service ids."""
        return f"{self.l3n4.key}/{self.scope.value}"

    def kv_value(self, ident: int) -> dict[str, Any]:
        return {
            "id": ident,
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol,
            "type": self.type.value,
            "scope": self.scope.value,
            "port_name": self.port_name,
        }


@dataclass(frozen=True)
class Backend:
    address: str
    port: int
    protocol: str
    state: BackendState
    node: str
    port_name: str
    weight: int = DEFAULT_WEIGHT

    @cached_property
    def l3n4(self) -> L3n4:
        return L3n4(self.address, self.port, self.protocol)

    def kv_value(self, ident: int) -> dict[str, Any]:
        return {
            "id": ident,
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol,
            "state": self.state.value,
            "node": self.node,
            "weight": self.weight,
            "port_name": self.port_name,
        }


def service_key(namespace: str, name: str) -> str:
    """The ``lb`` KV key of a Service (NATS keys cannot hold '/')."""
    return f"svc.{namespace}.{name}"


SERVICE_PREFIX = "svc."
TABLE_PREFIX = "tbl."
