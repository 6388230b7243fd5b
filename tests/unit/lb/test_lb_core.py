"""The lb core: backends from selectors and EndpointSlices, states, frontends, shared and
incrementally rebuilt Maglev tables, address allocation."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.resources.core import EndpointSlice, Service
from services.lb.core.allocation import RangeFull, ServiceRanges
from services.lb.core.derive import backends_from_endpoints, frontends, table_members
from services.lb.core.model import Backend, BackendState, FrontendType, L3n4, Scope
from services.lb.core.state import LbState, needed_ids

PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
         {"name": "dns", "port": 53, "protocol": "UDP"}]


def record(name: str, ip: str, *, ns: str = "x", ready: bool = True,
           labels: dict[str, str] | None = None, node: str = "n1") -> dict[str, Any]:
    return {"id": 1, "namespace": ns, "name": name, "labels": [], "identity": 1000,
            "ips": [ip], "node": node, "ports": PORTS, "pod_labels": labels or {"app": "web"},
            "ready": ready}


def svc(name: str = "web", ns: str = "x", status: dict[str, Any] | None = None,
        **spec: Any) -> Service:
    spec.setdefault("selector", {"app": "web"})
    spec.setdefault("clusterIP", "10.96.0.10")
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": "http"}])
    return Service.model_validate({"apiVersion": "v1", "kind": "Service",
                                   "metadata": {"name": name, "namespace": ns}, "spec": spec,
                                   "status": status or {}})


def endpoint_slice(service: str, ips: dict[str, dict[str, bool]], ns: str = "x",
                   name: str = "") -> EndpointSlice:
    return EndpointSlice.model_validate({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service}-1", "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": c} for ip, c in ips.items()],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})


def publish(state: LbState) -> Any:
    items = state.take_dirty()
    backends, fronts = needed_ids(items)
    for b in sorted(backends):
        _IDS.setdefault(b, len(_IDS) + 1)
    fids = {f: n for n, f in enumerate(sorted(fronts), start=1)}
    return state.render(items, _IDS, fids)


_IDS: dict[L3n4, int] = {}
"""Backend ids as the service hands them out: stable for the life of the process."""


def test_selector_picks_ready_pods_of_the_namespace_with_named_target_ports() -> None:
    service = svc(ports=[{"name": "web", "port": 80, "targetPort": "http"},
                         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                         {"name": "raw", "port": 9, "targetPort": 9000}])
    records = [record("a", "10.0.0.1"), record("b", "10.0.0.2", ready=False),
               record("c", "10.0.0.3", ns="y"), record("d", "10.0.0.4", labels={"app": "db"})]
    got = {(b.address, b.port, b.protocol, b.port_name)
           for b in backends_from_endpoints(service, records)}
    assert got == {("10.0.0.1", 8080, "TCP", "web"), ("10.0.0.1", 53, "UDP", "dns"),
                   ("10.0.0.1", 9000, "TCP", "raw")}


def test_named_target_port_needs_the_same_protocol() -> None:
    service = svc(ports=[{"name": "web", "port": 80, "protocol": "UDP", "targetPort": "http"}])
    assert backends_from_endpoints(service, [record("a", "10.0.0.1")]) == []


def test_frontends_per_type_and_traffic_policy_scope() -> None:
    service = svc(type="LoadBalancer", externalIPs=["192.0.2.7"], externalTrafficPolicy="Local",
                  ports=[{"name": "web", "port": 80, "nodePort": 30080}],
                  status={"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}})
    got = {(f.address, f.port, f.type, f.scope) for f in frontends(service)}
    assert got == {
        ("10.96.0.10", 80, FrontendType.CLUSTER_IP, Scope.CLUSTER),
        ("0.0.0.0", 30080, FrontendType.NODE_PORT, Scope.LOCAL),
        ("198.51.100.1", 80, FrontendType.LOAD_BALANCER, Scope.LOCAL),
        ("192.0.2.7", 80, FrontendType.EXTERNAL_IPS, Scope.LOCAL),
    }
    assert frontends(svc(clusterIP="None")) == []


def test_states_from_slices_and_terminating_fallback() -> None:
    state = LbState()
    state.set_service(svc(selector=None))
    state.set_slice(endpoint_slice("web", {
        "10.0.0.1": {"ready": True},
        "10.0.0.2": {"ready": False, "serving": True, "terminating": True},
        "10.0.0.3": {"ready": False, "serving": False, "terminating": True},
        "10.0.0.4": {"ready": False},
    }))
    changes = publish(state)
    value = changes.puts["svc.x.web"]
    states = {b["address"]: b["state"] for b in value["backends"]}
    assert states == {"10.0.0.1": "active", "10.0.0.2": "terminating"}
    table = state.tables[value["tables"]["http"]]
    assert table.backend_ids == (_IDS[L3n4("10.0.0.1", 8080, "TCP")],)
    only_terminating = [Backend("10.0.0.2", 80, "TCP", BackendState.TERMINATING, "", "")]
    assert table_members(only_terminating) == only_terminating
    quarantined = [Backend("10.0.0.2", 80, "TCP", BackendState.QUARANTINED, "", "")]
    assert table_members(quarantined) == []


def test_operator_states_leave_the_table() -> None:
    state = LbState()
    state.set_service(svc())
    for n in (1, 2):
        state.set_endpoint(f"x.p{n}", record(f"p{n}", f"10.0.0.{n}"))
    first = publish(state).puts["svc.x.web"]
    state.set_override(L3n4("10.0.0.1", 8080, "TCP"), BackendState.MAINTENANCE)
    value = publish(state).puts["svc.x.web"]
    assert {b["address"]: b["state"] for b in value["backends"]} == {
        "10.0.0.1": "maintenance", "10.0.0.2": "active"}
    assert state.tables[value["tables"]["http"]].backend_ids == (
        _IDS[L3n4("10.0.0.2", 8080, "TCP")],)
    state.set_override(L3n4("10.0.0.1", 8080, "TCP"), BackendState.ACTIVE)
    assert publish(state).puts["svc.x.web"]["tables"] == first["tables"]


def test_tables_are_shared_and_rebuilt_only_where_a_backend_changed() -> None:
    state = LbState()
    for n in range(50):
        state.set_service(svc(f"s{n}", clusterIP=f"10.96.1.{n + 1}"))
    state.set_service(svc("other", clusterIP="10.96.2.1", selector={"app": "db"}))
    for n in range(3):
        state.set_endpoint(f"x.w{n}", record(f"w{n}", f"10.0.0.{n + 1}"))
        state.set_endpoint(f"x.d{n}", record(f"d{n}", f"10.0.1.{n + 1}", labels={"app": "db"}))
    changes = publish(state)
    assert state.builds == 2, "51 services, two backend sets: two tables"
    assert len([k for k in changes.puts if k.startswith("tbl.")]) == 2
    keys = {changes.puts[f"svc.x.s{n}"]["tables"]["http"] for n in range(50)}
    assert len(keys) == 1
    other_key = changes.puts["svc.x.other"]["tables"]["http"]

    state.set_endpoint("x.w0", record("w0", "10.0.0.1", ready=False))
    changes = publish(state)
    assert state.builds == 3, "only the web table is rebuilt"
    assert "svc.x.other" not in changes.puts
    assert changes.deletes == keys
    assert other_key in state.tables
    assert len(changes.puts) == 51

    for n in range(50):
        state.delete_service("x", f"s{n}")
    changes = publish(state)
    assert f"svc.x.s{7}" in changes.deletes
    assert len([k for k in changes.deletes if k.startswith("tbl.")]) == 1
    assert set(state.tables) == {other_key}


def test_unchanged_inputs_publish_nothing_and_bursts_coalesce() -> None:
    state = LbState()
    state.set_service(svc())
    state.set_endpoint("x.a", record("a", "10.0.0.1"))
    publish(state)
    state.set_endpoint("x.a", record("a", "10.0.0.1"))
    assert not state.dirty
    for n in range(20):
        state.set_endpoint(f"x.b{n}", record(f"b{n}", f"10.0.2.{n + 1}"))
    before = state.builds
    changes = publish(state)
    assert state.builds == before + 1
    assert len(changes.puts["svc.x.web"]["backends"]) == 21


def test_local_scope_gets_per_node_tables() -> None:
    state = LbState()
    state.set_service(svc(internalTrafficPolicy="Local"))
    state.set_endpoint("x.a", record("a", "10.0.0.1", node="n1"))
    state.set_endpoint("x.b", record("b", "10.0.0.2", node="n2"))
    value = publish(state).puts["svc.x.web"]
    local = value["local_tables"]["http"]
    assert set(local) == {"n1", "n2"}
    assert state.tables[local["n1"]].backend_ids == (_IDS[L3n4("10.0.0.1", 8080, "TCP")],)


def test_random_algorithm_builds_no_table() -> None:
    state = LbState()
    service = svc()
    service.metadata.annotations["service.cilium.io/lb-algorithm"] = "random"
    state.set_service(service)
    state.set_endpoint("x.a", record("a", "10.0.0.1"))
    value = publish(state).puts["svc.x.web"]
    assert value["algorithm"] == "random" and value["tables"] == {} and state.builds == 0


def test_ranges_check_and_pick() -> None:
    ranges = ServiceRanges.parse("10.96.0.0/29", "30000-30002")
    assert ranges.ip_problem("10.96.0.3") is None
    assert "not in the service CIDR" in str(ranges.ip_problem("10.97.0.1"))
    assert ranges.ip_problem("10.96.0.0") is not None
    rng = random.Random(1)
    taken: set[str] = set()
    for _ in range(6):
        taken.add(ranges.pick_ip(taken, rng))
    assert taken == {f"10.96.0.{n}" for n in range(1, 7)}
    with pytest.raises(RangeFull):
        ranges.pick_ip(taken, rng)
    assert ranges.node_port_problem(29999) is not None
    assert ranges.pick_node_port({30000, 30001}, rng) == 30002


@given(st.sets(st.integers(0, 2**20 - 3), max_size=50), st.integers(0, 2**32))
def test_picked_addresses_are_free_and_inside(taken_offsets: set[int], seed: int) -> None:
    ranges = ServiceRanges.parse()
    base = int(ranges.cidr.network_address) + 1
    taken = {str(ipaddress.ip_address(base + o)) for o in taken_offsets}
    ip = ranges.pick_ip(taken, random.Random(seed))
    assert ip not in taken and ranges.ip_problem(ip) is None
