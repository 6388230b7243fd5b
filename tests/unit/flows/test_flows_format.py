"""Hubble's output formats for flows: compact lines, GetFlowsResponse JSON, table, wire codec."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.flows import (
    HTTP,
    Endpoint,
    Flow,
    Layer7,
    LostEvent,
    MessageType,
    TCPFlag,
    TrafficDirection,
    Verdict,
    compact,
    compact_record,
    decode_batch,
    drop_flow_defaults,
    encode_batch,
    get_flows_response,
    parse_rfc3339,
    rfc3339,
    table,
    trace_flow_defaults,
)
from ciliate.flows.codec import TABLE, pack_envelope, resolve_tables
from ciliate.flows.tables import L7FlowType, LostEventSource, MonitorTracePoint

T = 1_700_733_600_123_000_000  # 2023-11-23T10:00:00.123Z


def _policy_denied() -> Flow:
    return Flow(time_ns=T, node_name="kind-worker", verdict=Verdict.DROPPED,
                event_type=MessageType.POLICY_VERDICT, traffic_direction=TrafficDirection.INGRESS,
                is_reply=False, ip_version=1, source_ip="10.244.1.5", destination_ip="10.244.2.7",
                protocol=6, source_port=34512, destination_port=80, tcp_flags=TCPFlag.SYN,
                source=Endpoint(id=11, identity=1234, namespace="x", pod_name="a",
                                labels=["k8s:app=a"]),
                destination=Endpoint(id=22, identity=5678, namespace="y", pod_name="b"))


def test_compact_policy_verdict_denied_reads_like_hubble() -> None:
    assert compact(_policy_denied()) == (
        "Nov 23 10:00:00.123: x/a:34512 (ID:1234) -> y/b:80 (ID:5678) "
        "policy-verdict:none INGRESS DENIED (TCP Flags: SYN)")


def test_compact_drop_shows_the_readable_reason_and_reserved_identity() -> None:
    f = drop_flow_defaults(Flow(time_ns=T, is_reply=False, ip_version=1, source_ip="10.244.1.5",
                                destination_ip="1.1.1.1", protocol=6, source_port=41000,
                                destination_port=443, tcp_flags=TCPFlag.SYN,
                                source=Endpoint(identity=1234, namespace="x", pod_name="a"),
                                destination=Endpoint(identity=2)), 181)
    assert compact(f) == ("Nov 23 10:00:00.123: x/a:41000 (ID:1234) -> 1.1.1.1:443 (world) "
                          "Policy denied by denylist DROPPED (TCP Flags: SYN)")
    f.drop_reason = f.event_sub_type = 133
    assert "Policy denied DROPPED" in compact(f)


def test_compact_reply_flips_and_unknown_direction_uses_double_arrow() -> None:
    f = trace_flow_defaults(Flow(time_ns=T, verdict=Verdict.FORWARDED, is_reply=True,
                                 ip_version=1, source_ip="10.0.0.2", destination_ip="10.0.0.1",
                                 protocol=6, source_port=80, destination_port=34512,
                                 tcp_flags=TCPFlag.SYN | TCPFlag.ACK,
                                 source=Endpoint(identity=5678, namespace="y", pod_name="b"),
                                 destination=Endpoint(identity=1234, namespace="x",
                                                      pod_name="a")),
                            MonitorTracePoint.TO_LXC)
    assert compact(f) == ("Nov 23 10:00:00.123: x/a:34512 (ID:1234) <- y/b:80 (ID:5678) "
                          "to-endpoint FORWARDED (TCP Flags: SYN, ACK)")
    f.is_reply = None
    assert " <> " in compact(f)


def test_compact_ipv6_ports_are_bracketed_and_node_name_optional() -> None:
    f = Flow(time_ns=T, node_name="n1", event_type=MessageType.TRACE, verdict=Verdict.FORWARDED,
             is_reply=False, ip_version=2, source_ip="fd00::1", destination_ip="fd00::2",
             protocol=17, source_port=5353, destination_port=53)
    line = compact(f, node_name=True)
    assert line.startswith("Nov 23 10:00:00.123 [n1]: [fd00::1]:5353 (ID:0) -> [fd00::2]:53 ")
    assert line.endswith("FORWARDED (UDP)")


def test_json_is_get_flows_response_with_proto_field_names() -> None:
    line = json.dumps(get_flows_response(_policy_denied().to_wire()))
    obj = json.loads(line)
    assert set(obj) == {"flow", "node_name", "time"}
    assert obj["time"] == "2023-11-23T10:00:00.123Z"
    assert obj["node_name"] == "kind-worker"
    flow = obj["flow"]
    assert flow["verdict"] == "DROPPED"
    assert flow["IP"] == {"source": "10.244.1.5", "destination": "10.244.2.7",
                          "ipVersion": "IPv4"}
    assert flow["l4"] == {"TCP": {"source_port": 34512, "destination_port": 80,
                                  "flags": {"SYN": True}}}
    assert flow["source"] == {"ID": 11, "identity": 1234, "namespace": "x",
                              "labels": ["k8s:app=a"], "pod_name": "a"}
    assert flow["Type"] == "L3_L4"
    assert flow["traffic_direction"] == "INGRESS"
    assert flow["is_reply"] is False
    assert flow["event_type"] == {"type": 5}
    assert flow["Summary"] == "TCP Flags: SYN"


def test_json_drop_carries_enum_name_and_deprecated_number() -> None:
    f = drop_flow_defaults(Flow(time_ns=T, protocol=17, source_port=1, destination_port=2), 158)
    flow = get_flows_response(f.to_wire())["flow"]
    assert flow["drop_reason_desc"] == "SERVICE_BACKEND_NOT_FOUND"
    assert flow["drop_reason"] == 158
    assert flow["event_type"] == {"type": 1, "sub_type": 158}


def test_json_l7_http() -> None:
    f = Flow(time_ns=T, type=2, event_type=MessageType.ACCESS_LOG, verdict=Verdict.FORWARDED,
             l7=Layer7(type=L7FlowType.RESPONSE, latency_ns=2_000_000,
                       http=HTTP(code=200, method="GET", url="http://a/x", protocol="HTTP/1.1")))
    flow = get_flows_response(f.to_wire())["flow"]
    assert flow["Type"] == "L7"
    assert flow["l7"] == {"type": "RESPONSE", "latency_ns": "2000000",
                          "http": {"code": 200, "method": "GET", "url": "http://a/x",
                                   "protocol": "HTTP/1.1"}}
    assert flow["Summary"] == "HTTP/1.1 200 2ms (GET http://a/x)"


def test_lost_event_json_and_compact() -> None:
    w = LostEvent(source=LostEventSource.HUBBLE_RING_BUFFER, num_events_lost=7, cpu=1,
                  time_ns=T, node_name="n1").to_wire()
    assert get_flows_response(w) == {
        "lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "7", "cpu": 1},
        "node_name": "n1", "time": "2023-11-23T10:00:00.123Z"}
    assert compact_record(w) == "EVENTS LOST: HUBBLE_RING_BUFFER CPU(1) 7"


def test_table_aligns_columns_like_tabwriter() -> None:
    text = table([_policy_denied()])
    header, row = text.splitlines()
    assert header.split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT",
                              "SUMMARY"]
    assert header.index("SOURCE") == row.index("x/a:34512")
    assert header.index("VERDICT") == row.index("DENIED")
    assert row.endswith("TCP Flags: SYN")


def test_rfc3339_precision_and_inverse() -> None:
    assert rfc3339(T - 123_000_000) == "2023-11-23T10:00:00Z"
    assert rfc3339(T + 456_000) == "2023-11-23T10:00:00.123456Z"
    assert rfc3339(T + 7) == "2023-11-23T10:00:00.123000007Z"
    assert parse_rfc3339("2023-11-23T10:00:00.123000007Z") == T + 7


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=12)


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    ep = st.builds(Endpoint, id=st.integers(0, 65535), identity=st.integers(0, 1 << 24),
                   namespace=_names, pod_name=_names,
                   labels=st.lists(_names.map(lambda s: f"k8s:app={s}"), max_size=3))
    return Flow(time_ns=draw(st.integers(0, 2**62)), uuid=draw(_names), node_name=draw(_names),
                verdict=draw(st.sampled_from(list(Verdict))),
                drop_reason=draw(st.sampled_from([0, 133, 181])),
                event_type=draw(st.sampled_from(list(MessageType))),
                event_sub_type=draw(st.integers(0, 255)),
                traffic_direction=draw(st.sampled_from(list(TrafficDirection))),
                is_reply=draw(st.none() | st.booleans()), ip_version=1,
                source_ip="10.0.0.1", destination_ip="10.0.0.2",
                protocol=draw(st.sampled_from([0, 1, 6, 17, 58, 132])),
                source_port=draw(st.integers(0, 65535)),
                destination_port=draw(st.integers(0, 65535)),
                tcp_flags=draw(st.integers(0, 0x1FF)),
                source=draw(ep), destination=draw(ep))


@given(st.lists(flows(), max_size=5))
def test_wire_batch_round_trip_is_lossless(batch: list[Flow]) -> None:
    decoded = decode_batch(encode_batch(batch))
    assert [Flow.from_wire(w) for w in decoded] == batch
    for w in decoded:
        json.loads(json.dumps(get_flows_response(w)))


def test_trace_reason_travels_and_prints_by_name() -> None:
    from ciliate.flows import TraceReason
    from ciliate.flows.jsonpb import get_flows_response
    from ciliate.flows.model import Flow, decode_flow, encode_flow

    flow = Flow(time_ns=1, trace_reason=TraceReason.ESTABLISHED)
    wire = encode_flow(flow)
    assert wire["tr"] == 2
    assert decode_flow(wire).trace_reason == TraceReason.ESTABLISHED
    assert get_flows_response(wire)["flow"]["trace_reason"] == "ESTABLISHED"
    assert "tr" not in encode_flow(Flow(time_ns=1))


@given(st.lists(flows(), max_size=8), st.integers(0, 5))
def test_label_table_envelope_round_trip_is_lossless(batch: list[Flow], lost: int) -> None:
    wires = [f.to_wire() for f in batch]
    before = [dict(w) for w in wires]
    data = pack_envelope("node-1", wires, lost)
    assert wires == before  # the producer's dicts are not modified
    raw = msgpack.unpackb(data)
    assert raw["source"] == "node-1" and raw["lost"] == lost
    distinct = {tuple(w[k]) for w in before for k in ("sl", "dl") if k in w}
    assert sorted(map(tuple, raw.get(TABLE, []))) == sorted(distinct)  # each list once
    assert all(isinstance(w.get(k, 0), int) for w in raw["items"] for k in ("sl", "dl"))
    decoded = decode_batch(data)
    assert [Flow.from_wire(w) for w in decoded] == batch


def test_label_table_shares_one_list_per_distinct_label_set_and_shrinks_the_batch() -> None:
    labels = [f"k8s:io.kubernetes.pod.namespace=x{i}" for i in range(7)]
    wires = [Flow(time_ns=i, source=Endpoint(labels=labels), destination=Endpoint(
        labels=labels[:3])).to_wire() for i in range(100)]
    decoded = decode_batch(pack_envelope("n", wires, 0))
    assert decoded[0]["sl"] == labels and decoded[0]["dl"] == labels[:3]
    assert decoded[0]["sl"] is decoded[99]["sl"]  # decoded once per batch
    inline = msgpack.packb({"source": "n", "items": wires, "lost": 0})
    assert len(pack_envelope("n", wires, 0)) < len(inline) / 3


def test_label_table_refuses_what_does_not_resolve() -> None:
    for lt, items, field in (
        ("no", [{"sl": 0}], "lt"), ([["ok"], [1]], [{"sl": 0}], "lt"),
        ([["a"]], [{"sl": 1}], "sl/dl"), ([["a"]], [{"dl": -1}], "sl/dl"),
        ([["a"]], [{"sl": ["inline"]}], "sl/dl"), ([["a"]], [{"sl": "0"}], "sl/dl"),
    ):
        with pytest.raises(ValueError, match=field):
            resolve_tables(items, lt)
    items = [{"sl": 0, "dl": 0}, {"t": 1}]
    resolve_tables(items, [["k8s:app=a"]])
    assert items == [{"sl": ["k8s:app=a"], "dl": ["k8s:app=a"]}, {"t": 1}]
