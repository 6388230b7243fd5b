"""A Service and its endpoints -> frontends and backends, as kube-proxy replacement sees them.

Backends come from the EndpointSlices labelled with the Service's name when there are any;
otherwise, for a Service with a selector, from the pods (KV ``endpoints`` records) in the
Service's namespace whose labels match it, as the Kubernetes endpoints controller would
derive them. Readiness follows Cilium's EndpointSlice parser: ready endpoints are ``active``,
serving-and-terminating ones ``terminating``, and the rest are not backends at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ciliate.resources.core import EndpointSlice, Service, ServicePort, ServiceType
from services.lb.core.model import (
    ANY_ADDRESS,
    DEFAULT_WEIGHT,
    Backend,
    BackendState,
    Frontend,
    FrontendType,
    L3n4,
    Scope,
)

EndpointRecord = Mapping[str, Any]
"""One value of the KV ``endpoints`` bucket (written by the identity service)."""


def has_frontends(service: Service) -> bool:
    """Headless and ExternalName Services are DNS-only: nothing to load-balance."""
    return not service.headless and service.spec.type != ServiceType.EXTERNAL_NAME


def selects(service: Service) -> bool:
    """An empty selector is no selector (the API drops an empty map)."""
    return bool(service.spec.selector)


def _scope(policy: str | None) -> Scope:
    return Scope.LOCAL if policy == "Local" else Scope.CLUSTER


def frontends(service: Service) -> list[Frontend]:
    """Every frontend of a Service, per port, in a stable order.

    ClusterIP (internalTrafficPolicy decides its scope); NodePort as Cilium's surrogate
    ``0.0.0.0:<nodePort>`` (every node address); LoadBalancer ingress IPs and
    ``spec.loadBalancerIP``; externalIPs. The last three follow externalTrafficPolicy.
    """
    if not has_frontends(service):
        return []
    spec = service.spec
    internal = _scope(spec.internalTrafficPolicy)
    external = _scope(spec.externalTrafficPolicy)
    cluster_ips = [ip for ip in [spec.clusterIP, *spec.clusterIPs] if ip and ip != "None"]
    lb_ips: list[str] = []
    if spec.type == ServiceType.LOAD_BALANCER:
        lb_ips = [i.ip for i in service.status.loadBalancer.ingress if i.ip]
        if spec.loadBalancerIP:
            lb_ips.append(spec.loadBalancerIP)
    out: list[Frontend] = []
    for port in spec.ports:
        name = port.name or ""

        def add(address: str, number: int, kind: FrontendType, scope: Scope,
                port: ServicePort = port, name: str = name) -> None:
            fe = Frontend(address, number, port.protocol, kind, scope, name)
            if fe not in out:
                out.append(fe)

        for ip in cluster_ips:
            add(ip, port.port, FrontendType.CLUSTER_IP, internal)
        if port.nodePort is not None:
            add(ANY_ADDRESS, port.nodePort, FrontendType.NODE_PORT, external)
        for ip in lb_ips:
            add(ip, port.port, FrontendType.LOAD_BALANCER, external)
        for ip in spec.externalIPs:
            add(ip, port.port, FrontendType.EXTERNAL_IPS, external)
    return out


def slice_state(ready: bool, serving: bool, terminating: bool) -> BackendState | None:
    """Cilium's reading of EndpointSlice conditions (None: not a backend)."""
    if terminating:
        return BackendState.TERMINATING if serving else None
    return BackendState.ACTIVE if ready else None


def backends_from_slices(service: Service, slices: Iterable[EndpointSlice]) -> list[Backend]:
    """Backends of every Service port from its EndpointSlices (ports matched by name)."""
    out: dict[tuple[str, L3n4], Backend] = {}
    for port in service.spec.ports:
        name = port.name or ""
        for es in slices:
            if es.addressType == "FQDN":
                continue
            numbers = [p.port for p in es.ports
                       if (p.name or "") == name and p.protocol == port.protocol and p.port]
            if not numbers:
                continue
            for ep in es.endpoints:
                state = slice_state(ep.ready, ep.serving, ep.terminating)
                if state is None:
                    continue
                for address in ep.addresses:
                    backend = Backend(address, numbers[0], port.protocol, state,
                                      ep.nodeName or "", name)
                    out.setdefault((name, backend.l3n4), backend)
    return list(out.values())


def resolve_target(port: ServicePort, record: EndpointRecord) -> int | None:
    """The pod's port for a Service port: the number, or the named container port of the same
    protocol (None: this pod has no such port and is not a backend for it)."""
    target = port.target
    if isinstance(target, int):
        return target
    for named in record.get("ports") or ():
        if named.get("name") == target and named.get("protocol", "TCP") == port.protocol:
            return int(named["port"])
    return None


def pod_selected(service: Service, record: EndpointRecord) -> bool:
    selector = service.spec.selector or {}
    if record.get("namespace") != (service.metadata.namespace or "default"):
        return False
    labels = record.get("pod_labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def backends_from_endpoints(service: Service, records: Iterable[EndpointRecord]) -> list[Backend]:
    """Backends from the pods a selector matches; not-ready pods are not backends."""
    out: list[Backend] = []
    chosen = sorted((r for r in records if pod_selected(service, r) and r.get("ready", True)),
                    key=lambda r: (str(r.get("name")), list(r.get("ips") or ())))
    for port in service.spec.ports:
        for record in chosen:
            number = resolve_target(port, record)
            if number is None:
                continue
            for ip in record.get("ips") or ():
                out.append(Backend(str(ip), number, port.protocol, BackendState.ACTIVE,
                                   str(record.get("node") or ""), port.name or "",
                                   DEFAULT_WEIGHT))
    return out


def apply_overrides(backends: Iterable[Backend], overrides: Mapping[L3n4, BackendState]
                    ) -> list[Backend]:
    """An operator's state (quarantined, maintenance) wins over an ``active`` one; a
    terminating backend stays terminating (it is leaving anyway)."""
    out = []
    for b in backends:
        state = overrides.get(b.l3n4)
        if state is not None and b.state == BackendState.ACTIVE:
            b = Backend(b.address, b.port, b.protocol, state, b.node, b.port_name, b.weight)
        out.append(b)
    return out


def table_members(backends: Iterable[Backend]) -> list[Backend]:
    """Who may take new flows: active backends with a weight; when none is left, the
    terminating ones (Cilium's fallback, cilium/cilium#39743, after kube-proxy's)."""
    pool = [b for b in backends if b.weight > 0]
    active = [b for b in pool if b.state == BackendState.ACTIVE]
    return active or [b for b in pool if b.state == BackendState.TERMINATING]
