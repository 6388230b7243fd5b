"""``ciliate monitor`` lines for the records the datapath really publishes (ring-buffer record ->
decode -> Hubble flow -> wire), compared with cilium monitor's formats."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from ciliate.flows import pack_envelope
from ciliate.flows.model import LostEvent
from ciliate.flows.tables import (
    DropReason,
    LostEventSource,
    MessageType,
    TraceReason,
    TrafficDirection,
    Verdict,
)
from services.datapath.core.events import decode_event, encode_event
from services.datapath.core.flows import FlowContext, event_to_flow
from services.datapath.monitor import (
    MonitorType,
    batch_records,
    flow_hash,
    format_line,
    monitor_type,
    to_json,
    wanted,
)

ENDPOINTS = [
    {"id": 1234, "identity": 256, "namespace": "x", "name": "a", "ips": ["10.244.0.2"],
     "labels": ["k8s:app=a"]},
    {"id": 2345, "identity": 257, "namespace": "y", "name": "b", "ips": ["10.244.1.3"],
     "labels": ["k8s:app=b"]},
]
CTX = FlowContext.build("node-1", ENDPOINTS, [])
SYN, ACK = 0x02, 0x10


def wire(**kw: Any) -> dict[str, Any]:
    """What the agent publishes for one ring-buffer record."""
    base: dict[str, Any] = dict(src_identity=256, dst_identity=257, src_ip="10.244.0.2",
                                dst_ip="10.244.1.3", src_port=40000, dst_port=80, proto=6)
    base.update(kw)
    return event_to_flow(decode_event(encode_event(**base)), CTX).to_wire()


def test_trace_to_endpoint_reads_like_cilium() -> None:
    w = wire(type=MessageType.TRACE, verdict=Verdict.FORWARDED, drop_reason=0,
             direction=TrafficDirection.INGRESS, tcp_flags=SYN, trace_reason=TraceReason.NEW)
    assert format_line(w) == (
        f"-> endpoint 2345 flow {flow_hash(w):#x} identity 256->257 state new ifindex 0 "
        "orig-ip 10.244.0.2: 10.244.0.2:40000 -> 10.244.1.3:80 tcp SYN")


def test_trace_from_endpoint_reply_and_established() -> None:
    reply = wire(type=MessageType.TRACE, verdict=Verdict.FORWARDED, drop_reason=0,
                 direction=TrafficDirection.EGRESS, tcp_flags=SYN | ACK,
                 trace_reason=TraceReason.REPLY,
                 src_ip="10.244.1.3", dst_ip="10.244.0.2", src_port=80, dst_port=40000,
                 src_identity=257, dst_identity=256)
    line = format_line(reply)
    assert line.startswith("<- endpoint 2345 flow ")
    assert "state reply" in line and line.endswith("10.244.1.3:80 -> 10.244.0.2:40000 tcp SYN, ACK")
    est = wire(type=MessageType.TRACE, verdict=Verdict.FORWARDED, drop_reason=0,
               direction=TrafficDirection.EGRESS, tcp_flags=ACK,
               trace_reason=TraceReason.ESTABLISHED)
    assert "state established" in format_line(est)


def test_trace_state_is_the_datapaths_conntrack_state_not_the_flags() -> None:
    """A SYN the datapath saw reopen a tuple says reopened; a bare ACK it called new says new;
    a record without a trace reason says unknown (cilium monitor's connState names)."""
    for reason, flags, state in ((TraceReason.REOPENED, SYN, "reopened"),
                                 (TraceReason.NEW, ACK, "new"),
                                 (TraceReason.ESTABLISHED, SYN, "established"),
                                 (TraceReason.RELATED, 0, "related"),
                                 (TraceReason.TRACE_REASON_UNKNOWN, SYN, "unknown")):
        w = wire(type=MessageType.TRACE, verdict=Verdict.FORWARDED, drop_reason=0,
                 direction=TrafficDirection.INGRESS, tcp_flags=flags, trace_reason=reason)
        assert f" state {state} " in format_line(w), (reason, format_line(w))
        assert to_json(w)["state"] == state


def test_drop_names_reason_endpoint_and_identities() -> None:
    w = wire(type=MessageType.DROP, verdict=Verdict.DROPPED,
             drop_reason=DropReason.POLICY_DENIED, direction=TrafficDirection.INGRESS,
             tcp_flags=SYN)
    assert format_line(w) == (
        f"xx drop (Policy denied) flow {flow_hash(w):#x} to endpoint 2345, ifindex 0, "
        "identity 256->257: 10.244.0.2:40000 -> 10.244.1.3:80 tcp SYN")
    deny = wire(type=MessageType.DROP, verdict=Verdict.DROPPED,
                drop_reason=DropReason.POLICY_DENY, direction=TrafficDirection.EGRESS)
    assert format_line(deny).startswith("xx drop (Policy denied by denylist) flow ")


def test_policy_verdict_line() -> None:
    w = wire(type=MessageType.POLICY_VERDICT, verdict=Verdict.FORWARDED, drop_reason=0,
             direction=TrafficDirection.EGRESS, tcp_flags=SYN, match_type=2)
    assert format_line(w) == (
        f"Policy verdict log: flow {flow_hash(w):#x} local EP ID 1234, remote ID 257, proto 6, "
        "egress, action allow, auth: disabled, match L3-L4, "
        "10.244.0.2:40000 -> 10.244.1.3:80 tcp SYN")
    audit = wire(type=MessageType.POLICY_VERDICT, verdict=Verdict.AUDIT,
                 drop_reason=DropReason.POLICY_DENIED, direction=TrafficDirection.INGRESS,
                 src_identity=2, src_ip="1.1.1.1")
    assert "local EP ID 2345, remote ID world, proto 6, ingress, action audit" in format_line(audit)
    assert "remote ID 2," in format_line(audit, numeric=True)


def test_udp_and_icmp_summaries() -> None:
    udp = wire(type=MessageType.TRACE, verdict=Verdict.FORWARDED, drop_reason=0, proto=17,
               direction=TrafficDirection.INGRESS)
    assert format_line(udp).endswith(": 10.244.0.2:40000 -> 10.244.1.3:80 udp")
    icmp = {**wire(type=MessageType.DROP, verdict=Verdict.DROPPED, proto=1), "it": 8}
    assert format_line(icmp).endswith(": 10.244.0.2 -> 10.244.1.3 EchoRequest")


def test_lost_and_l7_lines() -> None:
    lost = LostEvent(source=LostEventSource.PERF_EVENT_RING_BUFFER, num_events_lost=7,
                     node_name="node-1").to_wire()
    assert format_line(lost) == "Lost 7 events (node node-1)"
    l7 = {"t": 1, "et": int(MessageType.ACCESS_LOG), "v": 1, "td": 1, "sid": 1234, "did": 2345,
          "si": 256, "di": 257, "sl": ["k8s:app=a"], "dl": ["k8s:app=b"],
          "l7": {"ty": 1, "http": {"method": "GET", "url": "http://b/x", "code": 0}}}
    assert format_line(l7) == ("<- Request http from 1234 ([k8s:app=a]) to 2345 ([k8s:app=b]), "
                               "identity 256->257, verdict Forwarded GET http://b/x => 0")


def test_json_objects_carry_cilium_fields() -> None:
    w = wire(type=MessageType.DROP, verdict=Verdict.DROPPED,
             drop_reason=DropReason.POLICY_DENIED, direction=TrafficDirection.INGRESS)
    obj = to_json(w)
    assert obj["type"] == "drop" and obj["reason"] == "Policy denied"
    assert (obj["srcLabel"], obj["dstLabel"], obj["dstID"]) == (256, 257, 2345)
    assert obj["summary"]["l4"] == {"src": "40000", "dst": "80"}
    assert obj["node"] == "node-1"


def test_type_and_related_to_filters() -> None:
    drop = wire(type=MessageType.DROP, verdict=Verdict.DROPPED, direction=TrafficDirection.INGRESS)
    trace = wire(type=MessageType.TRACE, verdict=Verdict.FORWARDED, drop_reason=0)
    assert monitor_type(drop) is MonitorType.DROP
    assert wanted(drop, [MonitorType.DROP]) and not wanted(trace, [MonitorType.DROP])
    assert wanted(trace, []) and wanted(trace, [MonitorType.TRACE, MonitorType.DROP])
    assert wanted(drop, [], related_to=[2345]) and not wanted(drop, [], related_to=[9])
    lost = {"k": "lost", "ln": 1}
    assert wanted(lost, [MonitorType.DROP], related_to=[9])  # loss is never filtered away


def test_batch_envelope_lost_count_comes_first() -> None:
    item = wire(type=MessageType.DROP, verdict=Verdict.DROPPED)
    recs = batch_records({"source": "node-1", "items": [item], "lost": 3})
    assert recs[0] == {"k": "lost", "ln": 3, "n": "node-1"} and recs[1] == item
    assert batch_records({"source": "n", "items": [item], "lost": 0}) == [item]
    assert batch_records([item, "junk"]) == [item]
    assert batch_records(b"junk") == []


def test_batch_envelope_label_table_is_resolved() -> None:
    item = wire(type=MessageType.DROP, verdict=Verdict.DROPPED)
    item["sl"], item["dl"] = ["k8s:app=a"], ["k8s:app=b"]
    data = pack_envelope("node-1", [item, dict(item)], 2)
    payload = msgpack.unpackb(data)
    assert "lt" in payload and payload["items"][0]["sl"] == 0
    recs = batch_records(payload)
    assert recs[0]["k"] == "lost" and recs[1:] == [item, item]
    payload = msgpack.unpackb(data)
    payload["items"][1]["dl"] = 9  # an index the table does not have: only the loss is shown
    assert batch_records(payload) == [{"k": "lost", "ln": 2, "n": "node-1"}]


@given(sport=st.integers(0, 65535), dport=st.integers(0, 65535), flags=st.integers(0, 0xFF),
       kind=st.sampled_from([MessageType.DROP, MessageType.TRACE, MessageType.POLICY_VERDICT]))
def test_every_record_ends_with_its_tuple(sport: int, dport: int, flags: int,
                                          kind: MessageType) -> None:
    w = wire(type=kind, src_port=sport, dst_port=dport, tcp_flags=flags)
    line = format_line(w)
    assert f"10.244.0.2:{sport} -> 10.244.1.3:{dport} tcp" in line
    assert ("SYN" in line.rsplit("tcp", 1)[1]) == bool(flags & SYN)
    assert flow_hash(w) == flow_hash(dict(w))
