"""The batch hot paths (compiled filter sets, per-batch metric counting) give exactly what the
per-record semantics give, for any mix of flows and filters."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliate.flows import LostEvent
from ciliate.flows.tables import LostEventSource
from services.events.core.filters import FilterSet, FlowFilter
from services.events.core.metrics import CONTEXT_OPTIONS, FlowMetrics, MetricOptions, flow_labels

NS = ("x", "y", "default", "")
PODS = ("a-1", "ab-2", "b-1", "")


@st.composite
def wires(draw: st.DrawFn) -> dict[str, Any]:
    """Wire flows with fields present or absent, labels as lists or (decoded) tuples."""
    w: dict[str, Any] = {"t": draw(st.integers(0, 10))}
    seq = draw(st.sampled_from((list, tuple)))
    for key, values in (("v", (1, 2, 3)), ("et", (1, 4, 5, 129)), ("es", (0, 1, 133)),
                        ("p", (1, 6, 17, 132)), ("sp", (80, 443, 5000)),
                        ("dp", (0, 53, 80, 443)), ("tf", (0, 2, 18, 17, 4)), ("ipv", (1, 2)),
                        ("rp", (True, False)), ("si", (1234, 5678)), ("di", (2, 5678)),
                        ("dr", (0, 133, 181)), ("n", ("n1", "n2")), ("sn", NS), ("dn", NS),
                        ("spn", PODS), ("dpn", PODS), ("td", (1, 2)),
                        ("sip", ("10.0.1.5", "10.0.2.7", "1.1.1.1")),
                        ("dip", ("10.0.1.5", "10.0.2.7"))):
        if draw(st.booleans()):
            w[key] = draw(st.sampled_from(values))
    if draw(st.booleans()):
        w["sl"] = seq(draw(st.lists(st.sampled_from(("k8s:app=a", "k8s:app=b", "k8s:x=1")),
                                    max_size=2, unique=True)))
    if draw(st.booleans()):
        w["sw"] = seq([seq([draw(st.sampled_from(("a", "b"))), "Deployment"])])
    if draw(st.integers(0, 9)) == 0:
        w["l7"] = {"ty": 1, draw(st.sampled_from(("http", "dns"))): {}}
    return w


def _lost(n: int) -> dict[str, Any]:
    return LostEvent(source=LostEventSource.PERF_EVENT_RING_BUFFER, num_events_lost=n).to_wire()


# An independent reading of Hubble's semantics for a subset of fields, record by record.
def _field_ok(name: str, values: list[Any], w: dict[str, Any]) -> bool:
    if name == "verdict":
        return w.get("v", 0) in {{"FORWARDED": 1, "DROPPED": 2, "ERROR": 3}[v] for v in values}
    if name in ("source_pod", "destination_pod"):
        s = name[0]
        ns, pod = w.get(s + "n", ""), w.get(s + "pn", "")
        if not ns and not pod:
            return False
        return any(ns == v.partition("/")[0] and pod.startswith(v.partition("/")[2])
                   for v in values)
    if name == "destination_port":
        return w.get("p") in (6, 17, 132) and w.get("dp", 0) in {int(v) for v in values}
    if name == "protocol":
        nums = {"tcp": 6, "udp": 17, "icmp": 1}
        return w.get("p") in {nums[v] for v in values}
    if name == "tcp_flags":
        bits = {"SYN": 2, "ACK": 16, "FIN": 1}
        return w.get("p") == 6 and any(
            all(w.get("tf", 0) & bits[f] for f in flags) for flags in values)
    if name == "node_name":
        return w.get("n", "") in values
    if name == "source_ip":
        ip = w.get("sip")
        return bool(ip) and any(ipaddress.ip_address(str(ip)) in ipaddress.ip_network(v)
                                for v in values)
    if name == "source_identity":
        return w.get("si", 0) in values
    if name == "reply":
        return w.get("rp") is not None and w["rp"] in values
    raise AssertionError(name)


FIELD_VALUES: dict[str, st.SearchStrategy[list[Any]]] = {
    "verdict": st.lists(st.sampled_from(("FORWARDED", "DROPPED", "ERROR")), min_size=1,
                        max_size=2),
    "source_pod": st.lists(st.sampled_from(("x/a", "y/", "x/ab", "default/b")), min_size=1,
                           max_size=2),
    "destination_pod": st.lists(st.sampled_from(("x/a", "y/b", "default/")), min_size=1,
                                max_size=2),
    "destination_port": st.lists(st.sampled_from(("80", "53", "443")), min_size=1, max_size=2),
    "protocol": st.lists(st.sampled_from(("tcp", "udp", "icmp")), min_size=1, max_size=2),
    "tcp_flags": st.lists(st.lists(st.sampled_from(("SYN", "ACK", "FIN")), min_size=1,
                                   max_size=2, unique=True), min_size=1, max_size=2),
    "node_name": st.lists(st.sampled_from(("n1", "n2")), min_size=1, max_size=2),
    "source_ip": st.lists(st.sampled_from(("10.0.1.5", "10.0.0.0/16", "1.1.1.1/32")),
                          min_size=1, max_size=2),
    "source_identity": st.lists(st.sampled_from((1234, 5678)), min_size=1, max_size=2),
    "reply": st.lists(st.booleans(), min_size=1, max_size=1),
}

filters_st = st.lists(st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)),
                                      st.just(None), min_size=1, max_size=3), max_size=2)


@st.composite
def filter_lists(draw: st.DrawFn) -> list[dict[str, list[Any]]]:
    return [{name: draw(FIELD_VALUES[name]) for name in spec} for spec in draw(filters_st)]


def _reference(white: list[dict[str, list[Any]]], black: list[dict[str, list[Any]]],
               w: dict[str, Any]) -> bool:
    if w.get("k") == "lost":
        return True

    def hit(ff: dict[str, list[Any]]) -> bool:
        return all(_field_ok(name, values, w) for name, values in ff.items())

    return (not white or any(hit(f) for f in white)) and not any(hit(f) for f in black)


@settings(max_examples=150)
@given(st.lists(st.one_of(wires(), st.builds(_lost, st.integers(1, 5))), max_size=30),
       filter_lists(), filter_lists())
def test_compiled_filter_sets_select_what_hubbles_semantics_say(
        batch: list[dict[str, Any]], white: list[dict[str, list[Any]]],
        black: list[dict[str, list[Any]]]) -> None:
    fs = FilterSet([FlowFilter(**f) for f in white], [FlowFilter(**f) for f in black])
    expected = [w for w in batch if _reference(white, black, w)]
    assert fs.select(batch) == expected
    assert [w for w in batch if fs.match(w)] == expected


contexts = st.sampled_from(("", *CONTEXT_OPTIONS))


@settings(max_examples=100)
@given(st.lists(st.one_of(wires(), st.builds(_lost, st.integers(1, 5))), max_size=40),
       st.lists(st.tuples(st.sampled_from(("flows-processed", "drop", "tcp",
                                           "port-distribution")), contexts, contexts),
                min_size=0, max_size=4, unique_by=lambda t: t[0]))
def test_batch_metric_counts_equal_per_flow_labels(
        batch: list[dict[str, Any]], specs: list[tuple[str, str, str]]) -> None:
    options = [MetricOptions(name, src, dst) for name, src, dst in specs]
    metrics = FlowMetrics(options)
    half = len(batch) // 2
    metrics.observe_many(batch[:half])  # two batches: the label cache is reused across them
    metrics.observe_many(batch[half:])
    for opt in options:
        expected: Counter[tuple[str, ...]] = Counter()
        for w in batch:
            if w.get("k") != "lost":
                expected.update(flow_labels(opt, w))
        assert metrics.counters[opt.name] == expected
    lost = sum(w["ln"] for w in batch if w.get("k") == "lost")
    assert sum(metrics.lost.values()) == lost
