"""Kubernetes NetworkPolicy (networking.k8s.io/v1), validated field by field.

The value checks shared with Cilium's policies (ports, protocols, CIDRs) are defined here once;
each is attached to the field it checks so an error's path names that field.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from ciliate.resources.base import Model, Resource
from ciliate.resources.selectors import ValidatedLabelSelector

K8S_PROTOCOLS = ("TCP", "UDP", "SCTP")
_IANA_SVC_NAME_MAX = 15


def check_cidr(text: str) -> str:
    """An IPv4/IPv6 prefix like ``10.0.0.0/8`` (a bare address is its host prefix), normalized."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"invalid CIDR {text!r}") from None


def check_port_number(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return port


def check_port_name(name: str) -> str:
    """An IANA service name: at most 15 lowercase alphanumerics or '-', with a letter."""
    ok = (
        0 < len(name) <= _IANA_SVC_NAME_MAX
        and all(c.isdigit() or c == "-" or ("a" <= c <= "z") for c in name)
        and any("a" <= c <= "z" for c in name)
        and not name.startswith("-")
        and not name.endswith("-")
        and "--" not in name
    )
    if not ok:
        raise ValueError(f"invalid named port {name!r}")
    return name


def check_k8s_protocol(value: str) -> str:
    if value not in K8S_PROTOCOLS:
        raise ValueError(f"unknown protocol {value!r}; expected one of {', '.join(K8S_PROTOCOLS)}")
    return value


CIDR = Annotated[str, AfterValidator(check_cidr)]
K8sProtocol = Annotated[str, AfterValidator(check_k8s_protocol)]


def check_end_port(end: int | None, start: int | str | None) -> int | None:
    """endPort needs a numeric port, is in range and not below it."""
    if end is None:
        return None
    if start is None:
        raise ValueError("endPort requires port")
    if isinstance(start, str):
        raise ValueError(f"endPort cannot be used with a named port ({start!r})")
    check_port_number(end)
    if end < start:
        raise ValueError(f"endPort {end} must not be below port {start}")
    return end


class IPBlock(Model):
    cidr: CIDR
    except_: list[CIDR] = Field(default_factory=list, alias="except")

    @field_validator("except_")
    @classmethod
    def _inside(cls, excepts: list[str], info: ValidationInfo) -> list[str]:
        outer = info.data.get("cidr")
        if outer is None:
            return excepts
        net = ipaddress.ip_network(outer)
        for ex in excepts:
            inner = ipaddress.ip_network(ex)
            if inner.version != net.version or not inner.subnet_of(net):  # type: ignore[arg-type]
                raise ValueError(f"except {ex} is not inside cidr {outer}")
        return excepts


class NetworkPolicyPeer(Model):
    podSelector: ValidatedLabelSelector | None = None
    namespaceSelector: ValidatedLabelSelector | None = None
    ipBlock: IPBlock | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> NetworkPolicyPeer:
        has_selector = self.podSelector is not None or self.namespaceSelector is not None
        if self.ipBlock is not None and has_selector:
            raise ValueError("ipBlock may not be combined with podSelector or namespaceSelector")
        if self.ipBlock is None and not has_selector:
            raise ValueError("must specify podSelector, namespaceSelector or ipBlock")
        return self


class NetworkPolicyPort(Model):
    protocol: K8sProtocol = "TCP"
    port: int | str | None = None
    endPort: int | None = None

    @field_validator("protocol", mode="before")
    @classmethod
    def _default_protocol(cls, value: Any) -> Any:
        return "TCP" if value is None else value

    @field_validator("port")
    @classmethod
    def _port(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int):
            return check_port_number(value)
        if isinstance(value, str):
            if value.isdigit():
                return check_port_number(int(value))
            return check_port_name(value)
        return None

    @field_validator("endPort")
    @classmethod
    def _end_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_end_port(value, info.data.get("port"))


class NetworkPolicyIngressRule(Model):
    from_: list[NetworkPolicyPeer] | None = Field(default=None, alias="from")
    ports: list[NetworkPolicyPort] | None = None


class NetworkPolicyEgressRule(Model):
    to: list[NetworkPolicyPeer] | None = None
    ports: list[NetworkPolicyPort] | None = None


PolicyType = Literal["Ingress", "Egress"]


class NetworkPolicySpec(Model):
    podSelector: ValidatedLabelSelector = Field(default_factory=ValidatedLabelSelector)
    policyTypes: list[PolicyType] | None = None
    ingress: list[NetworkPolicyIngressRule] | None = None
    egress: list[NetworkPolicyEgressRule] | None = None

    def effective_policy_types(self) -> tuple[bool, bool]:
        """(ingress, egress) enforcement: Kubernetes' defaulting when policyTypes is omitted.

        Ingress always; Egress only when the policy has an ``egress`` section.
        """
        if self.policyTypes:
            return "Ingress" in self.policyTypes, "Egress" in self.policyTypes
        return True, self.egress is not None and len(self.egress) > 0


class NetworkPolicy(Resource):
    KIND: ClassVar[str] = "NetworkPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("networking.k8s.io/v1",)
    NAMESPACED: ClassVar[bool] = True
    OWNER: ClassVar[str] = "policy"

    spec: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
