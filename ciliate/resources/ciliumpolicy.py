"""CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (cilium.io/v2), validated by field."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from ciliate.matchpattern import check_match_name, check_match_pattern
from ciliate.resources.base import Model, Resource
from ciliate.resources.networkpolicy import (
    CIDR,
    check_end_port,
    check_port_name,
    check_port_number,
)
from ciliate.resources.selectors import ValidatedLabelSelector

ENTITIES = (
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "health",
    "init",
    "unmanaged",
    "ingress",
    "none",
)
CILIUM_PROTOCOLS = ("TCP", "UDP", "SCTP", "ICMP", "ICMPV6", "ANY")


def check_entity(value: str) -> str:
    if value not in ENTITIES:
        raise ValueError(f"unknown entity {value!r}; expected one of {', '.join(ENTITIES)}")
    return value


def check_cilium_protocol(value: str) -> str:
    upper = value.upper()
    if upper not in CILIUM_PROTOCOLS:
        raise ValueError(
            f"unknown protocol {value!r}; expected one of {', '.join(CILIUM_PROTOCOLS)}"
        )
    return upper


Entity = Annotated[str, AfterValidator(check_entity)]
CiliumProtocol = Annotated[str, AfterValidator(check_cilium_protocol)]


class CIDRRule(Model):
    cidr: CIDR | None = None
    cidrGroupRef: str | None = None
    except_: list[CIDR] = Field(default_factory=list, alias="except")


class PortProtocol(Model):
    """``port`` is a string in Cilium ("80", "0" = any, or a named port)."""

    port: str | int = "0"
    endPort: int | None = None
    protocol: CiliumProtocol = "ANY"

    @field_validator("port")
    @classmethod
    def _port(cls, value: str | int) -> str | int:
        if isinstance(value, int) or value.isdigit():
            number = int(value)
            return 0 if number == 0 else check_port_number(number)
        return check_port_name(value)

    @field_validator("endPort")
    @classmethod
    def _end_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        start = info.data.get("port")
        if value is None or value == 0:
            return None
        if start == 0:
            raise ValueError("endPort requires a non-zero port")
        return check_end_port(value, start)


class PortRuleHTTP(Model):
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: list[str] = Field(default_factory=list)


class FQDNSelector(Model):
    """``rules.dns`` entries and ``toFQDNs`` peers (:mod:`ciliate.matchpattern`)."""

    matchName: str | None = None
    matchPattern: str | None = None

    @field_validator("matchName")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_match_name(value)

    @field_validator("matchPattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        return None if value is None else check_match_pattern(value)

    @model_validator(mode="after")
    def _one(self) -> FQDNSelector:
        if self.matchName and self.matchPattern:
            raise ValueError("only one of matchName or matchPattern is allowed")
        if not self.matchName and not self.matchPattern:
            raise ValueError("one of matchName or matchPattern is required")
        return self


class L7Rules(Model):
    http: list[PortRuleHTTP] | None = None
    dns: list[FQDNSelector] | None = None

    @model_validator(mode="after")
    def _one_protocol(self) -> L7Rules:
        if self.http is not None and self.dns is not None:
            raise ValueError("multiple L7 protocol rule types (http, dns) in one port rule")
        return self


class PortRule(Model):
    ports: list[PortProtocol] = Field(default_factory=list)
    rules: L7Rules | None = None


class ICMPField(Model):
    type: int | str
    family: Literal["IPv4", "IPv6"] = "IPv4"

    @field_validator("type")
    @classmethod
    def _type(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 255:
            raise ValueError(f"ICMP type {value} out of range 0-255")
        return value


class ICMPRule(Model):
    fields: list[ICMPField] = Field(default_factory=list)


class _PeerRule(Model):
    toPorts: list[PortRule] | None = None
    icmps: list[ICMPRule] | None = None


class IngressRule(_PeerRule):
    fromEndpoints: list[ValidatedLabelSelector] | None = None
    fromRequires: list[ValidatedLabelSelector] | None = None
    fromEntities: list[Entity] | None = None
    fromCIDR: list[CIDR] | None = None
    fromCIDRSet: list[CIDRRule] | None = None


class EgressRule(_PeerRule):
    toEndpoints: list[ValidatedLabelSelector] | None = None
    toRequires: list[ValidatedLabelSelector] | None = None
    toEntities: list[Entity] | None = None
    toCIDR: list[CIDR] | None = None
    toCIDRSet: list[CIDRRule] | None = None
    toServices: list[dict[str, Any]] | None = None
    toFQDNs: list[FQDNSelector] | None = None

    @model_validator(mode="after")
    def _fqdn_alone(self) -> EgressRule:
        if self.toFQDNs is not None:
            others = [f for f in ("toEndpoints", "toEntities", "toCIDR", "toCIDRSet",
                                  "toServices", "toRequires") if getattr(self, f) is not None]
            if others:
                raise ValueError(f"combining toFQDNs with {', '.join(others)} is not supported")
        return self


class IngressDenyRule(IngressRule):
    @model_validator(mode="after")
    def _no_l7(self) -> IngressDenyRule:
        _refuse_l7(self.toPorts)
        return self


class EgressDenyRule(EgressRule):
    @model_validator(mode="after")
    def _no_l7(self) -> EgressDenyRule:
        _refuse_l7(self.toPorts)
        if self.toFQDNs is not None:
            raise ValueError("deny rules cannot select toFQDNs")
        return self


def _refuse_l7(ports: list[PortRule] | None) -> None:
    if any(rule.rules is not None for rule in ports or ()):
        raise ValueError("deny rules cannot carry L7 rules (toPorts[].rules)")


class DefaultDeny(Model):
    ingress: bool | None = None
    egress: bool | None = None


class CiliumRule(Model):
    endpointSelector: ValidatedLabelSelector | None = None
    nodeSelector: ValidatedLabelSelector | None = None
    ingress: list[IngressRule] | None = None
    ingressDeny: list[IngressDenyRule] | None = None
    egress: list[EgressRule] | None = None
    egressDeny: list[EgressDenyRule] | None = None
    enableDefaultDeny: DefaultDeny = Field(default_factory=DefaultDeny)
    description: str | None = None
    labels: list[Any] | None = None

    @model_validator(mode="after")
    def _one_subject(self) -> CiliumRule:
        if (self.endpointSelector is None) == (self.nodeSelector is None):
            raise ValueError("exactly one of endpointSelector or nodeSelector is required")
        return self


class _CiliumPolicyBase(Resource):
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("cilium.io/v2",)
    OWNER: ClassVar[str] = "policy"

    spec: CiliumRule | None = None
    specs: list[CiliumRule] | None = None

    @model_validator(mode="after")
    def _has_rules(self) -> _CiliumPolicyBase:
        if self.spec is None and not self.specs:
            raise ValueError("spec or specs is required")
        return self

    def rules(self) -> list[CiliumRule]:
        return ([self.spec] if self.spec is not None else []) + list(self.specs or [])


class CiliumNetworkPolicy(_CiliumPolicyBase):
    KIND: ClassVar[str] = "CiliumNetworkPolicy"
    NAMESPACED: ClassVar[bool] = True


class CiliumClusterwideNetworkPolicy(_CiliumPolicyBase):
    KIND: ClassVar[str] = "CiliumClusterwideNetworkPolicy"
    NAMESPACED: ClassVar[bool] = False
