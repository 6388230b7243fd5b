"""Invalid core objects are refused with the path of the offending field."""

from __future__ import annotations

from typing import Any

import pytest

from ciliate.resources import (
    EndpointSlice,
    LbAlgorithm,
    Pod,
    ResourceError,
    Service,
    parse_resource,
)


def service(spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    meta = {"name": "web", "namespace": "default", **metadata}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def fields(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ResourceError) as info:
        parse_resource(doc)
    return {e.path: e.message for e in info.value.errors}


@pytest.mark.parametrize(
    ("ports", "path", "fragment"),
    [
        ([{"port": 80, "protocol": "ICMP"}], "spec.ports[0].protocol", "TCP"),
        ([{"port": 0}], "spec.ports[0].port", "greater than or equal to 1"),
        ([{"port": 65536}], "spec.ports[0].port", "less than or equal to 65535"),
        ([{"port": "80"}], "spec.ports[0].port", "integer"),
        ([{"port": 80, "targetPort": 70000}], "spec.ports[0].targetPort", "out of range"),
        ([{"port": 80, "targetPort": "Not_A_Name"}], "spec.ports[0].targetPort", "port name"),
        ([{"port": 80, "targetPort": True}], "spec.ports[0].targetPort", "number or a port name"),
        ([{"name": "a", "port": 80}, {"port": 81}], "spec.ports[1].name", "more than one port"),
        (
            [{"name": "a", "port": 80}, {"name": "a", "port": 81}],
            "spec.ports[1].name",
            "duplicate port name 'a'",
        ),
        (
            [{"name": "a", "port": 80}, {"name": "b", "port": 80}],
            "spec.ports[1].port",
            "duplicate port 80/TCP",
        ),
        ([{"port": 80, "nodePort": 30080}], "spec.ports[0].nodePort", "ClusterIP"),
    ],
)
def test_service_port_errors(ports: list[dict[str, Any]], path: str, fragment: str) -> None:
    errors = fields(service({"ports": ports}))
    assert path in errors, errors
    assert fragment in errors[path]


def test_service_valid_full_shape() -> None:
    svc = parse_resource(
        service(
            {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10"],
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                    {"name": "sig", "port": 80, "protocol": "SCTP"},
                ],
                "selector": {"app": "web"},
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Cluster",
                "externalIPs": ["192.0.2.1"],
            },
            annotations={"service.cilium.io/lb-algorithm": "maglev"},
        )
        | {"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}}
    )
    assert isinstance(svc, Service)
    assert svc.lb_algorithm is LbAlgorithm.MAGLEV
    assert [p.target for p in svc.spec.ports] == ["http", 5353, 80]
    assert svc.spec.sessionAffinityConfig is not None
    assert svc.spec.sessionAffinityConfig.clientIP.timeoutSeconds == 60
    assert svc.status.loadBalancer.ingress[0].ip == "198.51.100.7"
    assert svc.port_named("dns") is not None and not svc.headless


@pytest.mark.parametrize(
    ("spec", "metadata", "path"),
    [
        ({"type": "Bogus"}, {}, "spec.type"),
        ({"clusterIP": "10.96.0.300"}, {}, "spec.clusterIP"),
        ({"externalIPs": ["nope"]}, {}, "spec.externalIPs[0]"),
        ({"sessionAffinity": "Sticky"}, {}, "spec.sessionAffinity"),
        ({"externalTrafficPolicy": "Global"}, {}, "spec.externalTrafficPolicy"),
        ({"type": "ExternalName"}, {}, "spec.externalName"),
        (
            {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}},
            {},
            "spec.sessionAffinityConfig",
        ),
        (
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
            },
            {},
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ),
        (
            {},
            {"annotations": {"service.cilium.io/lb-algorithm": "round-robin"}},
            "metadata.annotations.service.cilium.io/lb-algorithm",
        ),
        ({}, {"name": "9web"}, "metadata.name"),
        ({}, {"name": ""}, "metadata.name"),
        ({}, {"namespace": "Bad_NS"}, "metadata.namespace"),
    ],
)
def test_service_field_errors(spec: dict[str, Any], metadata: dict[str, Any], path: str) -> None:
    assert path in fields(service(spec, **metadata))


def test_headless_service() -> None:
    svc = parse_resource(service({"clusterIP": "None", "ports": [{"port": 80}]}))
    assert isinstance(svc, Service) and svc.headless


def pod(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x"}}
    return doc | {"spec": spec, "status": status or {}}


@pytest.mark.parametrize(
    ("ports", "path"),
    [
        ([{"containerPort": 0}], "spec.containers[0].ports[0].containerPort"),
        ([{"containerPort": 80, "protocol": "icmp"}], "spec.containers[0].ports[0].protocol"),
        (
            [{"containerPort": 80, "name": "much-too-long-port-name"}],
            "spec.containers[0].ports[0].name",
        ),
        ([{"containerPort": 80, "name": "8080"}], "spec.containers[0].ports[0].name"),
        (
            [{"containerPort": 80, "name": "web"}, {"containerPort": 81, "name": "web"}],
            "spec.containers[0].ports[1].name",
        ),
    ],
)
def test_pod_port_errors(ports: list[dict[str, Any]], path: str) -> None:
    assert path in fields(pod({"containers": [{"name": "c", "ports": ports}]}))


def test_pod_status_errors_and_readiness() -> None:
    assert "status.podIP" in fields(pod({}, {"podIP": "10.0.0.999"}))
    assert "status.phase" in fields(pod({}, {"phase": "Sleeping"}))
    ready = parse_resource(
        pod(
            {"nodeName": "n1", "serviceAccountName": "sa"},
            {
                "podIP": "10.244.1.5",
                "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}],
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "False"}],
            },
        )
    )
    assert isinstance(ready, Pod)
    assert ready.ips == ["10.244.1.5", "fd00::5"]
    assert not ready.ready  # an explicit Ready=False condition wins over the phase
    pending = parse_resource(pod({}, {"phase": "Pending"}))
    assert isinstance(pending, Pod) and not pending.ready


def slice_doc(**body: Any) -> dict[str, Any]:
    meta = {
        "name": "web-abc",
        "namespace": "default",
        "labels": {"kubernetes.io/service-name": "web"},
    }
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta} | body


def test_endpointslice_shape_and_conditions() -> None:
    es = parse_resource(
        slice_doc(
            addressType="IPv4",
            endpoints=[
                {
                    "addresses": ["10.244.1.5"],
                    "nodeName": "n1",
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": "web-1"},
                },
                {
                    "addresses": ["10.244.1.6"],
                    "conditions": {"ready": False, "serving": True, "terminating": True},
                },
            ],
            ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
        )
    )
    assert isinstance(es, EndpointSlice)
    assert es.service_name == "web"
    first, second = es.endpoints
    assert first.ready and first.serving and not first.terminating  # unset means ready
    assert not second.ready and second.serving and second.terminating
    assert first.targetRef is not None and first.targetRef.name == "web-1"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"addressType": "IPv5"}, "addressType"),
        (
            {"addressType": "IPv4", "endpoints": [{"addresses": ["fd00::1"]}]},
            "endpoints[0].addresses[0]",
        ),
        (
            {"addressType": "IPv6", "endpoints": [{"addresses": ["10.0.0.1"]}]},
            "endpoints[0].addresses[0]",
        ),
        ({"addressType": "IPv4", "endpoints": [{"addresses": []}]}, "endpoints[0].addresses"),
        ({"addressType": "IPv4", "ports": [{"port": 99999}]}, "ports[0].port"),
        ({"addressType": "IPv4", "ports": [{"port": 80, "protocol": "GRE"}]}, "ports[0].protocol"),
        (
            {
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}],
            },
            "endpoints[0].conditions.ready",
        ),
    ],
)
def test_endpointslice_errors(body: dict[str, Any], path: str) -> None:
    assert path in fields(slice_doc(**body))


def test_unknown_fields_are_kept() -> None:
    doc = service(
        {"ports": [{"port": 80, "futureField": {"x": 1}}], "ipFamilyPolicy": "SingleStack"}
    )
    svc = parse_resource(doc)
    dumped = svc.model_dump(exclude_unset=True)
    assert dumped["spec"]["ipFamilyPolicy"] == "SingleStack"
    assert dumped["spec"]["ports"][0]["futureField"] == {"x": 1}


def test_kind_must_match_class() -> None:
    from ciliate.resources import validate_model

    with pytest.raises(ResourceError) as info:
        validate_model(Service, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}})
    assert [e.path for e in info.value.errors] == ["kind"]
