"""Hubble's metric names/labels as counters, and the exporter's filters and field mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ciliate.flows import (
    Endpoint,
    Flow,
    LostEvent,
    MessageType,
    TCPFlag,
    Verdict,
    drop_flow_defaults,
    get_flows_response,
    trace_flow_defaults,
)
from ciliate.flows.tables import LostEventSource, MonitorTracePoint
from services.events.core.exporter import ExportConfig, ExporterCore, apply_field_mask
from services.events.core.filters import FlowFilter
from services.events.core.metrics import FlowMetrics, MetricOptions
from services.events.export_file import RotatingFile


def _drop() -> dict[str, object]:
    return drop_flow_defaults(Flow(
        time_ns=5, protocol=6, ip_version=1, source_ip="10.0.0.1", destination_ip="10.0.0.2",
        source_port=1000, destination_port=80, tcp_flags=TCPFlag.SYN,
        source=Endpoint(namespace="x", pod_name="a"),
        destination=Endpoint(namespace="y", pod_name="b")), 133).to_wire()


def _trace() -> dict[str, object]:
    return trace_flow_defaults(Flow(
        time_ns=6, verdict=Verdict.FORWARDED, is_reply=False, protocol=6, ip_version=1,
        source_port=1000, destination_port=80, tcp_flags=TCPFlag.SYN | TCPFlag.ACK,
        source=Endpoint(namespace="x", pod_name="a"),
        destination=Endpoint(namespace="y", pod_name="b")), MonitorTracePoint.TO_LXC).to_wire()


def _by_name(m: FlowMetrics) -> dict[str, tuple[tuple[str, ...], dict[tuple[str, ...], int]]]:
    return {spec.name: (labels, values) for spec, labels, values in m.samples()}


def test_hubble_metric_names_and_labels() -> None:
    m = FlowMetrics.from_config(["flows-processed", "drop", "tcp", "port-distribution"])
    for w in (_drop(), _trace(), _trace()):
        m.observe(w)
    m.observe(LostEvent(source=LostEventSource.HUBBLE_RING_BUFFER, num_events_lost=4).to_wire())
    s = _by_name(m)
    assert s["hubble_flows_processed_total"] == (
        ("type", "subtype", "verdict"),
        {("Drop", "", "DROPPED"): 1, ("Trace", "to-endpoint", "FORWARDED"): 2})
    assert s["hubble_drop_total"] == (("reason", "protocol"), {("POLICY_DENIED", "TCP"): 1})
    assert s["hubble_tcp_flags_total"][1] == {("SYN", "IPv4"): 1, ("SYN-ACK", "IPv4"): 2}
    assert s["hubble_port_distribution_total"][1] == {("TCP", "80"): 2}
    assert s["hubble_lost_events_total"] == (("source",), {("hubble_ring_buffer",): 4})


def test_metric_context_options_add_source_and_destination_labels() -> None:
    m = FlowMetrics.from_config(["drop:sourceContext=namespace;destinationContext=pod"])
    m.observe(_drop())
    labels, values = _by_name(m)["hubble_drop_total"]
    assert labels == ("source", "destination", "reason", "protocol")
    assert values == {("x", "y/b", "POLICY_DENIED", "TCP"): 1}


@pytest.mark.parametrize("text", ["nope", "drop:sourceContext=planet", "drop:colour=red"])
def test_bad_metric_options_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        MetricOptions.parse(text)


def test_exporter_allow_deny_and_field_mask() -> None:
    core = ExporterCore(ExportConfig(allow_list=[FlowFilter(verdict=["DROPPED", "FORWARDED"])],
                                     deny_list=[FlowFilter(verdict=["FORWARDED"])],
                                     field_mask=["time", "verdict", "source.namespace"]))
    assert core.render(_trace()) is None
    line = core.render_line(_drop())
    assert line is not None and line.endswith("\n")
    obj = json.loads(line)
    assert obj["flow"] == {"time": "1970-01-01T00:00:00.000000005Z", "verdict": "DROPPED",
                           "source": {"namespace": "x"}}
    assert (core.exported, core.skipped) == (1, 1)


def test_otlp_log_record_body_is_the_response_json_and_attributes_follow_the_mask() -> None:
    core = ExporterCore(ExportConfig(deny_list=[FlowFilter(verdict=["FORWARDED"])]))
    assert core.render_log(_trace()) is None
    rec = core.render_log(_drop())
    assert rec is not None and rec.time_ns == 5
    assert json.loads(rec.body) == get_flows_response(_drop())
    assert rec.attributes["cilium.event_kind"] == "flow/v1alpha2"
    assert rec.attributes["cilium.flow.verdict"] == "DROPPED"
    assert rec.attributes["cilium.flow.drop_reason"] == "POLICY_DENIED"
    assert rec.attributes["cilium.flow.destination.pod_name"] == "b"
    masked = ExporterCore(ExportConfig(field_mask=["verdict"])).render_log(_drop())
    assert masked is not None
    assert [k for k in masked.attributes if k.startswith("cilium.flow.")] == [
        "cilium.flow.verdict"]
    lost = LostEvent(source=LostEventSource.PERF_EVENT_RING_BUFFER, num_events_lost=3,
                     time_ns=9).to_wire()
    rec = core.render_log(lost)
    assert rec is not None and rec.attributes["cilium.event_kind"] == "lost_events"
    assert json.loads(rec.body)["lost_events"]["num_events_lost"] == "3"


def test_field_mask_keeps_whole_messages_and_merges_siblings() -> None:
    obj = {"a": {"b": 1, "c": 2, "d": {"e": 3}}, "f": 4}
    assert apply_field_mask(obj, ["a.b", "a.d", "g"]) == {"a": {"b": 1, "d": {"e": 3}}}


def test_rotating_file_rotates_by_size(tmp_path: Path) -> None:
    out = RotatingFile(tmp_path / "flows.json", max_bytes=100, backups=2)
    for i in range(10):
        out.write(json.dumps({"i": i, "pad": "x" * 20}) + "\n")
    out.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["flows.json", "flows.json.1", "flows.json.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    last = (tmp_path / "flows.json").read_text().splitlines()
    assert json.loads(last[-1])["i"] == 9


def test_message_type_used_for_l7_metrics() -> None:
    m = FlowMetrics.from_config(["flows-processed"])
    m.observe(Flow(event_type=MessageType.ACCESS_LOG, verdict=Verdict.FORWARDED).to_wire())
    assert _by_name(m)["hubble_flows_processed_total"][1] == {("L7", "", "FORWARDED"): 1}
