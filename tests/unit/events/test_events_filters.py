"""Hubble's filter semantics, flag by flag, against hand-written expectations."""

from __future__ import annotations

import pytest

from ciliate.flows import (
    DNS,
    HTTP,
    Endpoint,
    Flow,
    Layer7,
    LostEvent,
    MessageType,
    TCPFlag,
    TrafficDirection,
    Verdict,
    drop_flow_defaults,
    trace_flow_defaults,
)
from ciliate.flows.tables import L7FlowType, LostEventSource, MonitorTracePoint
from services.events.core.cliflags import filters_from_flags
from services.events.core.filters import FilterError, FilterSet, FlowFilter

T0 = 1_700_733_600_000_000_000


def _ep(ns: str, pod: str, identity: int, app: str) -> Endpoint:
    return Endpoint(id=identity % 1000, identity=identity, namespace=ns, pod_name=pod,
                    labels=[f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}"])


def _flows() -> dict[str, Flow]:
    xa, yb = _ep("x", "a-7d9f", 1234, "a"), _ep("y", "b-55c1", 5678, "b")
    f1 = Flow(time_ns=T0 + 1, node_name="n1", verdict=Verdict.DROPPED,
              event_type=MessageType.POLICY_VERDICT, traffic_direction=TrafficDirection.INGRESS,
              is_reply=False, ip_version=1, source_ip="10.0.1.5", destination_ip="10.0.2.7",
              protocol=6, source_port=34512, destination_port=80, tcp_flags=TCPFlag.SYN,
              source=xa, destination=yb)
    f2 = trace_flow_defaults(Flow(
        time_ns=T0 + 2, node_name="n2", verdict=Verdict.FORWARDED, is_reply=True,
        ip_version=1, source_ip="10.0.2.7", destination_ip="10.0.1.5", protocol=6,
        source_port=80, destination_port=34512, tcp_flags=TCPFlag.SYN | TCPFlag.ACK,
        source=yb, destination=xa), MonitorTracePoint.TO_LXC)
    f3 = trace_flow_defaults(Flow(
        time_ns=T0 + 3, node_name="n1", verdict=Verdict.FORWARDED, is_reply=False,
        ip_version=1, source_ip="10.0.1.9", destination_ip="10.0.3.3", protocol=17,
        source_port=40000, destination_port=53, source=_ep("x", "c-1", 1300, "c"),
        destination=_ep("z", "a-1", 1400, "dns")), MonitorTracePoint.TO_STACK)
    f4 = drop_flow_defaults(Flow(
        time_ns=T0 + 4, node_name="n1", is_reply=False, ip_version=1, source_ip="10.0.1.5",
        destination_ip="1.1.1.1", protocol=6, source_port=41000, destination_port=443,
        tcp_flags=TCPFlag.SYN, source=xa, destination=Endpoint(identity=2,
                                                                labels=["reserved:world"])),
        181)
    f5 = Flow(time_ns=T0 + 5, node_name="n2", verdict=Verdict.FORWARDED, type=2,
              event_type=MessageType.ACCESS_LOG, is_reply=False, ip_version=1,
              source_ip="10.0.3.4", destination_ip="10.0.2.8", protocol=6, source_port=50000,
              destination_port=80, source=_ep("z", "b-1", 1500, "web"),
              destination=_ep("y", "a-1", 1600, "api"),
              l7=Layer7(type=L7FlowType.REQUEST,
                        http=HTTP(code=200, method="GET", url="http://api/api/v1/items?x=1",
                                  protocol="HTTP/1.1")))
    f6 = trace_flow_defaults(Flow(
        time_ns=T0 + 6, node_name="n2", verdict=Verdict.FORWARDED, is_reply=False,
        ip_version=1, source_ip="10.0.1.20", destination_ip="10.0.2.30", protocol=1,
        icmp_type=8, source=_ep("x", "b-1", 1700, "b"), destination=_ep("y", "c-1", 1800, "c")),
        MonitorTracePoint.TO_LXC)
    return {"F1": f1, "F2": f2, "F3": f3, "F4": f4, "F5": f5, "F6": f6}


FLOWS = _flows()
WIRES = {name: f.to_wire() for name, f in FLOWS.items()}
ALL = set(FLOWS)


def _run(flags: list[tuple[str, str]]) -> set[str]:
    white, black = filters_from_flags(flags)
    fs = FilterSet(white, black)
    return {name for name, w in WIRES.items() if fs.match(w)}


CASES: list[tuple[str, list[tuple[str, str]], set[str]]] = [
    ("no filter", [], ALL),
    ("pod is source or destination", [("pod", "x/a")], {"F1", "F2", "F4"}),
    ("pod prefix", [("pod", "x/a-7")], {"F1", "F2", "F4"}),
    ("bare pod name means namespace default", [("pod", "a")], set()),
    ("from-pod is source only", [("from-pod", "x/a")], {"F1", "F4"}),
    ("to-pod is destination only", [("to-pod", "x/a")], {"F2"}),
    ("same flag twice ORs", [("from-pod", "x/c"), ("from-pod", "z/b")], {"F3", "F5"}),
    ("namespace either side", [("namespace", "x")], {"F1", "F2", "F3", "F4", "F6"}),
    ("namespace with pod", [("namespace", "y"), ("pod", "b")], {"F1", "F2"}),
    ("from-namespace", [("from-namespace", "z")], {"F5"}),
    ("from-pod and to-namespace AND", [("from-pod", "x/a"), ("to-namespace", "y")], {"F1"}),
    ("verdict", [("verdict", "DROPPED")], {"F1", "F4"}),
    ("verdict ORed", [("verdict", "DROPPED"), ("verdict", "FORWARDED")], ALL),
    ("different flags AND", [("verdict", "DROPPED"), ("to-port", "80")], {"F1"}),
    ("AND of either-side pod and verdict",
     [("pod", "x/a"), ("verdict", "FORWARDED")], {"F2"}),
    ("--not verdict", [("not", ""), ("verdict", "DROPPED")], {"F2", "F3", "F5", "F6"}),
    ("--not applies to the next flag only",
     [("not", ""), ("verdict", "DROPPED"), ("from-namespace", "x")], {"F3", "F6"}),
    ("--not pod excludes either side", [("not", ""), ("pod", "x/a")], {"F3", "F5", "F6"}),
    ("whitelist and blacklist", [("namespace", "y"), ("not", ""), ("protocol", "icmp")],
     {"F1", "F2", "F5"}),
    ("two --not ORed in the blacklist",
     [("not", ""), ("verdict", "DROPPED"), ("not", ""), ("verdict", "FORWARDED")], set()),
    ("type drop", [("type", "drop")], {"F4"}),
    ("type policy-verdict", [("type", "policy-verdict")], {"F1"}),
    ("type trace", [("type", "trace")], {"F2", "F3", "F6"}),
    ("type trace sub-type", [("type", "trace:to-endpoint")], {"F2", "F6"}),
    ("type l7", [("type", "l7")], {"F5"}),
    ("types ORed", [("type", "drop"), ("type", "l7")], {"F4", "F5"}),
    ("protocol udp", [("protocol", "udp")], {"F3"}),
    ("protocol l7 http", [("protocol", "http")], {"F5"}),
    ("protocol icmp", [("protocol", "ICMP")], {"F6"}),
    ("port either side", [("port", "80")], {"F1", "F2", "F5"}),
    ("from-port", [("from-port", "80")], {"F2"}),
    ("identity either side", [("identity", "1234")], {"F1", "F2", "F4"}),
    ("reserved identity by name", [("identity", "world")], {"F4"}),
    ("to-identity", [("to-identity", "1234")], {"F2"}),
    ("ip exact", [("ip", "1.1.1.1")], {"F4"}),
    ("from-ip cidr", [("from-ip", "10.0.1.0/24")], {"F1", "F3", "F4", "F6"}),
    ("label either side", [("label", "app=b")], {"F1", "F2", "F6"}),
    ("from-label with source prefix", [("from-label", "k8s:app in (c, web)")], {"F3", "F5"}),
    ("label negation", [("to-label", "!app")], {"F4"}),
    ("http-status prefix", [("http-status", "2+")], {"F5"}),
    ("http-status no match", [("http-status", "404")], set()),
    ("http-method case-insensitive", [("http-method", "get")], {"F5"}),
    ("http-path regex", [("http-path", "^/api/v1/")], {"F5"}),
    ("node-name", [("node-name", "n2")], {"F2", "F5", "F6"}),
    ("node-name glob", [("node-name", "n*")], ALL),
    ("tcp-flags subset", [("tcp-flags", "SYN")], {"F1", "F2", "F4"}),
    ("tcp-flags all given must be set", [("tcp-flags", "SYN,ACK")], {"F2"}),
    ("traffic-direction", [("traffic-direction", "ingress")], {"F1"}),
]


@pytest.mark.parametrize(("flags", "expected"), [(c[1], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_flags_select_exactly_the_expected_flows(flags: list[tuple[str, str]],
                                                 expected: set[str]) -> None:
    assert _run(flags) == expected


def test_pod_flag_builds_left_and_right_filters_like_hubble() -> None:
    white, black = filters_from_flags([("pod", "x/a"), ("verdict", "DROPPED")])
    assert [f.to_json() for f in white] == [
        {"source_pod": ["x/a"], "verdict": ["DROPPED"]},
        {"destination_pod": ["x/a"], "verdict": ["DROPPED"]},
    ]
    assert black == []


def test_one_sided_flags_collapse_to_one_filter() -> None:
    white, _ = filters_from_flags([("from-pod", "x/a"), ("to-port", "80")])
    assert [f.to_json() for f in white] == [{"source_pod": ["x/a"], "destination_port": ["80"]}]


def test_namespace_fills_pod_filters() -> None:
    white, _ = filters_from_flags([("namespace", "kube-system")])
    assert [f.to_json() for f in white] == [{"source_pod": ["kube-system/"]},
                                            {"destination_pod": ["kube-system/"]}]


@pytest.mark.parametrize("flags", [
    [("label", "app=a"), ("from-label", "app=b")],
    [("port", "80"), ("to-port", "81")],
    [("not", ""), ("not", ""), ("verdict", "DROPPED")],
    [("verdict", "MAYBE")],
    [("type", "nonsense")],
    [("ip", "10.0.0.300")],
    [("identity", "planet")],
    [("from-pod", "y/b"), ("namespace", "x")],
])
def test_bad_flag_combinations_are_refused(flags: list[tuple[str, str]]) -> None:
    with pytest.raises(FilterError):
        white, black = filters_from_flags(flags)
        FilterSet(white, black)


def test_lost_events_pass_every_filter() -> None:
    fs = FilterSet([FlowFilter(verdict=["DROPPED"])], [FlowFilter(node_name=["*"])])
    lost = LostEvent(source=LostEventSource.HUBBLE_RING_BUFFER, num_events_lost=3).to_wire()
    assert fs.match(lost)


def test_filter_json_round_trip_keeps_semantics() -> None:
    white, black = filters_from_flags([("type", "trace:to-endpoint"), ("tcp-flags", "syn"),
                                       ("not", ""), ("node-name", "n1")])
    fs = FilterSet.from_json(FilterSet(white, black).to_json())
    assert {n for n, w in WIRES.items() if fs.match(w)} == {"F2"}


def test_dns_flow_matches_protocol_dns_only() -> None:
    w = Flow(event_type=MessageType.ACCESS_LOG, type=2,
             l7=Layer7(type=L7FlowType.REQUEST, dns=DNS(query="api."))).to_wire()
    assert FilterSet([FlowFilter(protocol=["dns"])]).match(w)
    assert not FilterSet([FlowFilter(protocol=["http"])]).match(w)
