"""Kubernetes core kinds Ciliate stores: Namespace, Pod, Service (v1) and EndpointSlice.

Only the fields the services act on are typed; everything else a user writes is kept as-is
(``extra="allow"``). Values Kubernetes itself would refuse (a port out of range, an unknown
protocol, two unnamed ports on one Service, ...) are refused here with the field's path, so a
bad object never reaches the store.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, PlainValidator, StrictBool, StrictInt, model_validator

from ciliate.resources.base import Loc, Model, Resource, raise_field_errors

# --- shared value types -------------------------------------------------------------------

Protocol = Literal["TCP", "UDP", "SCTP"]
"""L4 protocols a Kubernetes port may name."""

PROTOCOL_NUMBERS: dict[str, int] = {"TCP": 6, "UDP": 17, "SCTP": 132}
"""IANA protocol numbers, as the policy and lb maps store them."""

PortNumber = Annotated[StrictInt, Field(ge=1, le=65535)]
"""A TCP/UDP/SCTP port; strict so that a quoted ``"80"`` is refused as Kubernetes does."""

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def port_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid IANA service name (Kubernetes' rule for port names), or None."""
    if not 1 <= len(name) <= 15:
        return "must be 1-15 characters"
    if not _IANA_SVC_NAME.match(name) or "--" in name:
        return "must be lowercase letters, digits and '-', not starting, ending or doubling '-'"
    if not any(c.isalpha() for c in name):
        return "must contain at least one letter"
    return None


def _port_name(value: str) -> str:
    problem = port_name_problem(value)
    if problem:
        raise ValueError(f"invalid port name {value!r}: {problem}")
    return value


def _ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


PortName = Annotated[str, AfterValidator(_port_name)]
IPAddress = Annotated[str, AfterValidator(_ip)]


def _name_problems(
    meta_name: str, pattern: re.Pattern[str], max_len: int, what: str
) -> list[tuple[Loc, str, Any]]:
    if not meta_name:
        return [(("metadata", "name"), "required", meta_name)]
    if len(meta_name) > max_len or not pattern.match(meta_name):
        return [
            (
                ("metadata", "name"),
                f"{meta_name!r} is not a valid {what} (lowercase letters, digits, '-', "
                f"at most {max_len} characters)",
                meta_name,
            )
        ]
    return []


def metadata_problems(
    resource: Resource,
    pattern: re.Pattern[str] = _DNS_SUBDOMAIN,
    max_len: int = 253,
    what: str = "DNS subdomain name",
) -> list[tuple[Loc, str, Any]]:
    """Name and namespace checks every stored kind shares (Kubernetes' naming rules)."""
    problems = _name_problems(resource.metadata.name, pattern, max_len, what)
    ns = resource.metadata.namespace
    if ns is not None and resource.NAMESPACED and not (len(ns) <= 63 and _DNS_LABEL.match(ns)):
        problems.append((("metadata", "namespace"), f"{ns!r} is not a valid namespace name", ns))
    return problems


def duplicates(values: Sequence[Any]) -> list[int]:
    """Indexes of entries equal to an earlier entry (None entries are ignored)."""
    seen: set[Any] = set()
    dup = []
    for index, value in enumerate(values):
        if value is None:
            continue
        if value in seen:
            dup.append(index)
        seen.add(value)
    return dup


# --- Namespace ----------------------------------------------------------------------------


class Namespace(Resource):
    """A Kubernetes namespace; its labels feed namespace selectors and identities."""

    KIND: ClassVar[str] = "Namespace"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = False
    OWNER: ClassVar[str] = "identity"

    apiVersion: Literal["v1"] = "v1"
    kind: Literal["Namespace"] = "Namespace"

    @model_validator(mode="after")
    def _check(self) -> Namespace:
        raise_field_errors(
            "Namespace", metadata_problems(self, _DNS_LABEL, 63, "namespace name (DNS label)")
        )
        return self


# --- Pod ----------------------------------------------------------------------------------


class ContainerPort(Model):
    name: PortName | None = None
    containerPort: PortNumber
    protocol: Protocol = "TCP"
    hostPort: Annotated[StrictInt, Field(ge=0, le=65535)] | None = None


class Container(Model):
    name: str
    image: str | None = None
    ports: list[ContainerPort] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ports(self) -> Container:
        names = [p.name for p in self.ports]
        pairs = [(p.containerPort, p.protocol) for p in self.ports]
        raise_field_errors(
            "Container",
            [
                (("ports", i, "name"), f"duplicate port name {names[i]!r}", names[i])
                for i in duplicates(names)
            ]
            + [
                (
                    ("ports", i, "containerPort"),
                    f"duplicate port {pairs[i][0]}/{pairs[i][1]}",
                    pairs[i][0],
                )
                for i in duplicates(pairs)
            ],
        )
        return self


class PodSpec(Model):
    containers: list[Container] = Field(default_factory=list)
    initContainers: list[Container] = Field(default_factory=list)
    nodeName: str | None = None
    serviceAccountName: str | None = None
    hostNetwork: StrictBool = False


class PodIP(Model):
    ip: IPAddress


class PodCondition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]


PodPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]


class PodStatus(Model):
    podIP: IPAddress | None = None
    podIPs: list[PodIP] = Field(default_factory=list)
    phase: PodPhase | None = None
    conditions: list[PodCondition] = Field(default_factory=list)


class Pod(Resource):
    """A pod: an endpoint whose labels give its identity and whose named ports policies use."""

    KIND: ClassVar[str] = "Pod"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = True
    OWNER: ClassVar[str] = "identity"

    apiVersion: Literal["v1"] = "v1"
    kind: Literal["Pod"] = "Pod"
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)

    @model_validator(mode="after")
    def _check(self) -> Pod:
        raise_field_errors("Pod", metadata_problems(self))
        return self

    @property
    def ips(self) -> list[str]:
        """Every pod IP: ``status.podIPs`` when given, else ``status.podIP``."""
        ips = [p.ip for p in self.status.podIPs]
        if self.status.podIP and self.status.podIP not in ips:
            ips.insert(0, self.status.podIP)
        return ips

    @property
    def ports(self) -> list[ContainerPort]:
        """All container ports of the pod, in container order."""
        return [port for c in self.spec.containers for port in c.ports]

    def named_port(self, name: str, protocol: str | None = None) -> ContainerPort | None:
        """The container port called ``name`` (optionally of ``protocol``), as named-port
        resolution in policies and Service targetPorts needs."""
        for port in self.ports:
            if port.name == name and (protocol is None or port.protocol == protocol):
                return port
        return None

    @property
    def ready(self) -> bool:
        """Whether the pod serves traffic.

        A ``Ready`` condition decides when present; without one (hand-written dev pods carry
        no status conditions) a pod is ready unless its phase says it is not running.
        """
        for condition in self.status.conditions:
            if condition.type == "Ready":
                return condition.status == "True"
        return self.status.phase in (None, "Running")


# --- Service ------------------------------------------------------------------------------


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class LbAlgorithm(StrEnum):
    """Backend selection as Cilium's ``service.cilium.io/lb-algorithm`` annotation names it."""

    MAGLEV = "maglev"
    RANDOM = "random"


LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"


def _target_port(value: Any) -> int | str:
    """Kubernetes' IntOrString for targetPort: a port number or a container port name."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            raise ValueError(f"port {value} out of range 1-65535")
        return value
    if isinstance(value, str):
        return _port_name(value)
    raise ValueError("must be a port number or a port name")


TargetPort = Annotated[int | str, PlainValidator(_target_port)]


class ServicePort(Model):
    name: PortName | None = None
    protocol: Protocol = "TCP"
    port: PortNumber
    targetPort: TargetPort | None = None
    nodePort: PortNumber | None = None
    appProtocol: str | None = None

    @property
    def target(self) -> int | str:
        """The backend port: a number, or a container port name to resolve per pod."""
        return self.port if self.targetPort is None else self.targetPort


class ClientIPConfig(Model):
    timeoutSeconds: Annotated[StrictInt, Field(ge=1, le=86400)] = 10800


class SessionAffinityConfig(Model):
    clientIP: ClientIPConfig = Field(default_factory=ClientIPConfig)


TrafficPolicy = Literal["Cluster", "Local"]


def _cluster_ip(value: str) -> str:
    return value if value in ("", "None") else _ip(value)


ClusterIP = Annotated[str, AfterValidator(_cluster_ip)]


class ServiceSpec(Model):
    type: ServiceType = ServiceType.CLUSTER_IP
    clusterIP: ClusterIP | None = None
    clusterIPs: list[ClusterIP] = Field(default_factory=list)
    ports: list[ServicePort] = Field(default_factory=list)
    selector: dict[str, str] | None = None
    sessionAffinity: Literal["None", "ClientIP"] = "None"
    sessionAffinityConfig: SessionAffinityConfig | None = None
    externalTrafficPolicy: TrafficPolicy | None = None
    internalTrafficPolicy: TrafficPolicy | None = None
    externalIPs: list[IPAddress] = Field(default_factory=list)
    externalName: str | None = None
    loadBalancerIP: IPAddress | None = None
    loadBalancerSourceRanges: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ServiceSpec:
        problems: list[tuple[Loc, str, Any]] = []
        if len(self.ports) > 1:
            problems += [
                (("ports", i, "name"), "required when a Service has more than one port", None)
                for i, p in enumerate(self.ports)
                if not p.name
            ]
        names = [p.name for p in self.ports]
        problems += [
            (("ports", i, "name"), f"duplicate port name {names[i]!r}", names[i])
            for i in duplicates(names)
        ]
        pairs = [(p.port, p.protocol) for p in self.ports]
        problems += [
            (("ports", i, "port"), f"duplicate port {pairs[i][0]}/{pairs[i][1]}", pairs[i][0])
            for i in duplicates(pairs)
        ]
        if self.type not in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER):
            problems += [
                (("ports", i, "nodePort"), f"not allowed for type {self.type.value}", p.nodePort)
                for i, p in enumerate(self.ports)
                if p.nodePort is not None
            ]
        if self.type == ServiceType.EXTERNAL_NAME and not self.externalName:
            problems.append((("externalName",), "required for type ExternalName", None))
        if self.sessionAffinityConfig is not None and self.sessionAffinity != "ClientIP":
            problems.append(
                (("sessionAffinityConfig",), "only allowed with sessionAffinity ClientIP", None)
            )
        if self.clusterIP and self.clusterIPs and self.clusterIPs[0] != self.clusterIP:
            problems.append(
                (("clusterIPs", 0), "must equal clusterIP when both are set", self.clusterIPs[0])
            )
        raise_field_errors("ServiceSpec", problems)
        return self


class LoadBalancerIngress(Model):
    ip: IPAddress | None = None
    hostname: str | None = None


class LoadBalancerStatus(Model):
    ingress: list[LoadBalancerIngress] = Field(default_factory=list)


class ServiceStatus(Model):
    loadBalancer: LoadBalancerStatus = Field(default_factory=LoadBalancerStatus)


class Service(Resource):
    """A Service: frontends (cluster IP, node ports, external/LB IPs) for a set of backends."""

    KIND: ClassVar[str] = "Service"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = True
    OWNER: ClassVar[str] = "lb"

    apiVersion: Literal["v1"] = "v1"
    kind: Literal["Service"] = "Service"
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: ServiceStatus = Field(default_factory=ServiceStatus)

    @model_validator(mode="after")
    def _check(self) -> Service:
        problems = metadata_problems(self, _DNS_1035_LABEL, 63, "Service name (DNS-1035 label)")
        algorithm = self.metadata.annotations.get(LB_ALGORITHM_ANNOTATION)
        if algorithm is not None and algorithm not in set(LbAlgorithm):
            problems.append(
                (
                    ("metadata", "annotations", LB_ALGORITHM_ANNOTATION),
                    f"must be one of {', '.join(LbAlgorithm)}, not {algorithm!r}",
                    algorithm,
                )
            )
        raise_field_errors("Service", problems)
        return self

    @property
    def lb_algorithm(self) -> LbAlgorithm | None:
        """The per-service algorithm annotation, or None to use the cluster default."""
        value = self.metadata.annotations.get(LB_ALGORITHM_ANNOTATION)
        return LbAlgorithm(value) if value is not None else None

    @property
    def headless(self) -> bool:
        return self.spec.clusterIP == "None"

    def port_named(self, name: str) -> ServicePort | None:
        return next((p for p in self.spec.ports if p.name == name), None)


# --- EndpointSlice ------------------------------------------------------------------------

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class EndpointConditions(Model):
    ready: StrictBool | None = None
    serving: StrictBool | None = None
    terminating: StrictBool | None = None


class ObjectReference(Model):
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None


class Endpoint(Model):
    addresses: Annotated[list[str], Field(min_length=1, max_length=100)]
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    nodeName: str | None = None
    hostname: str | None = None
    zone: str | None = None
    targetRef: ObjectReference | None = None

    @property
    def ready(self) -> bool:
        """Kubernetes: an unset ``ready`` condition means ready."""
        return self.conditions.ready is not False

    @property
    def serving(self) -> bool:
        """Unset ``serving`` falls back to ``ready``, as the API documents."""
        if self.conditions.serving is None:
            return self.ready
        return self.conditions.serving

    @property
    def terminating(self) -> bool:
        return self.conditions.terminating is True


class EndpointPort(Model):
    name: str | None = None
    protocol: Protocol = "TCP"
    port: PortNumber | None = None
    appProtocol: str | None = None


AddressType = Literal["IPv4", "IPv6", "FQDN"]

_ADDRESS_CHECKS: dict[str, Callable[[str], bool]] = {
    "IPv4": lambda a: _is_ip_version(a, 4),
    "IPv6": lambda a: _is_ip_version(a, 6),
    "FQDN": lambda a: bool(_DNS_SUBDOMAIN.match(a)) and len(a) <= 253,
}


def _is_ip_version(address: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(address).version == version
    except ValueError:
        return False


class EndpointSlice(Resource):
    """A slice of a Service's backends, as controllers (or users) publish them."""

    KIND: ClassVar[str] = "EndpointSlice"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("discovery.k8s.io/v1",)
    NAMESPACED: ClassVar[bool] = True
    OWNER: ClassVar[str] = "lb"

    apiVersion: Literal["discovery.k8s.io/v1"] = "discovery.k8s.io/v1"
    kind: Literal["EndpointSlice"] = "EndpointSlice"
    addressType: AddressType
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> EndpointSlice:
        problems = metadata_problems(self)
        valid = _ADDRESS_CHECKS[self.addressType]
        for i, endpoint in enumerate(self.endpoints):
            problems += [
                (("endpoints", i, "addresses", j), f"{a!r} is not a valid {self.addressType}", a)
                for j, a in enumerate(endpoint.addresses)
                if not valid(a)
            ]
        names = [p.name or "" for p in self.ports]
        problems += [
            (("ports", i, "name"), f"duplicate port name {names[i]!r}", names[i])
            for i in duplicates(names)
        ]
        raise_field_errors("EndpointSlice", problems)
        return self

    @property
    def service_name(self) -> str | None:
        """The Service this slice belongs to (label ``kubernetes.io/service-name``)."""
        return self.metadata.labels.get(SERVICE_NAME_LABEL)
