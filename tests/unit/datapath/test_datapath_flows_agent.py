"""Ring-buffer events become Hubble flows with both sides named from the KV view; the agent's
pure helpers (remote routes, enforcement counts) decide what users see in routes and metrics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.flows.jsonpb import flow_json
from ciliate.flows.model import Flow
from ciliate.flows.tables import MessageType, TraceReason, TrafficDirection, Verdict
from services.datapath.core.events import EVENT_SIZE, decode_event, encode_event
from services.datapath.core.flows import FlowContext, event_to_flow
from services.datapath.core.plan import desired_state
from services.datapath.service import enforcement_counts, local_pods, remote_routes

ENDPOINTS = {
    "x.a": {"id": 7, "namespace": "x", "name": "a", "labels": ["k8s:pod=a"], "identity": 300,
            "ips": ["10.0.0.1"], "node": "node-1"},
    "y.b": {"id": 9, "namespace": "y", "name": "b", "labels": ["k8s:pod=b"], "identity": 301,
            "ips": ["10.0.0.2"], "node": "node-2"},
}
IDENTITIES = [{"id": 2, "labels": ["reserved:world"]}]


def _ctx() -> FlowContext:
    return FlowContext.build("node-1", ENDPOINTS.values(), IDENTITIES, clock_offset_ns=1000)


def test_drop_event_becomes_hubble_flow_with_both_endpoints() -> None:
    raw = encode_event(ts_ns=5, src_identity=301, dst_identity=300, src_ip="10.0.0.2",
                       dst_ip="10.0.0.1", src_port=40000, dst_port=80, drop_reason=133,
                       tcp_flags=0x02, direction=TrafficDirection.INGRESS)
    j = flow_json(Flow.from_wire(event_to_flow(decode_event(raw), _ctx()).to_wire()))
    assert j["verdict"] == "DROPPED" and j["drop_reason_desc"] == "POLICY_DENIED"
    assert j["time"].endswith("Z") and j["node_name"] == "node-1"
    assert j["source"] == {"ID": 9, "identity": 301, "namespace": "y", "labels": ["k8s:pod=b"],
                           "pod_name": "b"}
    assert j["destination"]["pod_name"] == "a" and j["destination"]["identity"] == 300
    assert j["l4"]["TCP"]["destination_port"] == 80
    assert j["l4"]["TCP"]["flags"] == {"SYN": True}
    assert j["traffic_direction"] == "INGRESS" and j["event_type"]["type"] == MessageType.DROP


def test_unknown_peer_gets_identity_labels_and_trace_gets_observation_point() -> None:
    raw = encode_event(src_identity=300, dst_identity=2, src_ip="10.0.0.1", dst_ip="1.2.3.4",
                       type=MessageType.TRACE, verdict=Verdict.FORWARDED, drop_reason=0,
                       direction=TrafficDirection.EGRESS, is_reply=True)
    f = event_to_flow(decode_event(raw), _ctx())
    assert f.destination.labels == ["reserved:world"] and f.destination.pod_name == ""
    j = flow_json(f)
    assert j["trace_observation_point"] == "FROM_ENDPOINT" and j["is_reply"] is True
    assert j["verdict"] == "FORWARDED"


@pytest.mark.parametrize("reason", list(TraceReason)[:6])
def test_trace_reason_travels_from_record_to_hubble_json(reason: TraceReason) -> None:
    raw = encode_event(src_ip="10.0.0.1", dst_ip="10.0.0.2", type=MessageType.TRACE,
                       verdict=Verdict.FORWARDED, drop_reason=0, trace_reason=reason,
                       direction=TrafficDirection.INGRESS)
    assert len(raw) == EVENT_SIZE == 48  # the C struct's size did not change
    ev = decode_event(raw)
    assert ev["trace_reason"] == reason.name
    f = event_to_flow(ev, _ctx())
    assert f.trace_reason == reason
    w = f.to_wire()
    assert w.get("tr", 0) == reason and Flow.from_wire(w).trace_reason == reason
    j = flow_json(f)
    assert j.get("trace_reason", "TRACE_REASON_UNKNOWN") == reason.name
    assert j["is_reply"] is (reason == TraceReason.REPLY)


def test_drop_records_carry_no_trace_reason() -> None:
    f = event_to_flow(decode_event(encode_event(src_ip="10.0.0.2", dst_ip="10.0.0.1")), _ctx())
    assert f.trace_reason == TraceReason.TRACE_REASON_UNKNOWN and f.is_reply is False
    assert "trace_reason" not in flow_json(f)


@given(st.integers(0, 255))
def test_any_trace_reason_byte_decodes_and_reply_is_exactly_reason_3(byte: int) -> None:
    ev = decode_event(encode_event(type=MessageType.TRACE, trace_reason=byte))
    assert ev["is_reply"] is (byte == TraceReason.REPLY)
    assert event_to_flow(ev, _ctx()).trace_reason == byte


def test_remote_routes_point_at_the_other_node_and_wait_for_its_address() -> None:
    nodes = {"node-2": {"name": "node-2", "addresses": ["10.99.0.2"]}}
    assert remote_routes("node-1", ENDPOINTS, nodes) == {"10.0.0.2": "10.99.0.2"}
    assert remote_routes("node-1", ENDPOINTS, {}) == {}
    assert set(local_pods("node-1", ENDPOINTS)) == {"x.a"}


def test_enforcement_counts_per_endpoint() -> None:
    policy = {"identity": 300, "revision": 1, "enforce": {"ingress": True, "egress": False},
              "entries": []}
    state = desired_state(node="node-1", endpoints=ENDPOINTS.values(), ipcache=[],
                          policies={300: policy})
    assert enforcement_counts(state) == {"ingress": 1, "egress": 0, "both": 0, "none": 0}


def test_events_carry_the_host_interface_monitor_prints() -> None:
    from services.datapath.monitor import format_line

    raw = encode_event(ts_ns=5, src_identity=301, dst_identity=300, src_ip="10.0.0.2",
                       dst_ip="10.0.0.1", src_port=40000, dst_port=80, ifindex=42,
                       type=MessageType.TRACE, verdict=Verdict.FORWARDED, drop_reason=0,
                       tcp_flags=0x02, direction=TrafficDirection.INGRESS)
    ctx = FlowContext.build("node-1", ENDPOINTS.values(), IDENTITIES,
                            ifnames={42: "lxc1a2b3c"})
    flow = event_to_flow(decode_event(raw), ctx)
    assert flow.interface == (42, "lxc1a2b3c")
    assert " ifindex lxc1a2b3c " in format_line(flow.to_wire())
    unknown = event_to_flow(decode_event(raw), _ctx())
    assert unknown.interface == (42, "")
