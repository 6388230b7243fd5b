"""OTLP export for real: the events service's OpenTelemetry SDK exporter POSTs protobuf log
records to a small OTLP/HTTP receiver (aiohttp, 127.0.0.1); flows injected on NATS arrive as
log records with the GetFlowsResponse JSON as body, the denyList keeps a flow out, and a
receiver that refuses the batches is counted in the service status while ingest goes on."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from ciliate.flows import (
    Endpoint,
    Flow,
    TCPFlag,
    TrafficDirection,
    Verdict,
    drop_flow_defaults,
    trace_flow_defaults,
)
from ciliate.stack.ports import free_port
from services.events.testing import EventsService, Starter

T0 = 1_700_000_000_000_000_000


def _flow(uuid: str, t: int, src: str, dst: str, drop: int = 0) -> Flow:
    (sns, spod), (dns, dpod) = src.split("/"), dst.split("/")
    f = Flow(time_ns=T0 + t, uuid=uuid, node_name="n1", verdict=Verdict.FORWARDED,
             traffic_direction=TrafficDirection.INGRESS, is_reply=False, ip_version=1,
             source_ip="10.0.1.1", destination_ip="10.0.2.1", protocol=6, source_port=40000 + t,
             destination_port=80, tcp_flags=TCPFlag.SYN,
             source=Endpoint(id=1, identity=1001, namespace=sns, pod_name=spod,
                             labels=[f"k8s:app={spod}"]),
             destination=Endpoint(id=2, identity=1002, namespace=dns, pod_name=dpod,
                                  labels=[f"k8s:app={dpod}"]))
    return drop_flow_defaults(f, drop) if drop else trace_flow_defaults(f, 0)


FLOWS = [_flow("f1", 1, "x/a", "y/b"), _flow("f2", 2, "x/a", "y/c", drop=133),
         _flow("f3", 3, "y/b", "x/a")]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Receiver:
    """An OTLP/HTTP logs endpoint: ``/v1/logs`` accepts, ``/refuse`` answers 400."""

    url: str
    records: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    refused: int = 0

    async def until(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.records) < count:
            assert time.monotonic() < deadline, f"{len(self.records)} of {count} log records"
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    rec = Receiver(f"http://127.0.0.1:{port}")

    async def logs(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        req = ExportLogsServiceRequest.FromString(await request.read())
        rec.headers.append(dict(request.headers))
        for rl in req.resource_logs:
            resource = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    rec.records.append({
                        "resource": resource, "time": lr.time_unix_nano,
                        "body": _value(lr.body),
                        "attributes": {kv.key: _value(kv.value) for kv in lr.attributes}})
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def refuse(_: web.Request) -> web.Response:
        rec.refused += 1
        return web.Response(status=400, text="no")

    app = web.Application()
    app.router.add_post("/v1/logs", logs)
    app.router.add_post("/refuse", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield rec
    finally:
        await runner.cleanup()


async def _otlp_status(events: EventsService, done: Callable[[dict[str, Any]], bool],
                       timeout: float = 10) -> dict[str, Any]:
    """The ``otlp`` part of /v1/observer/status, once ``done`` holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        st: dict[str, Any] = (await events.status()).get("otlp", {})
        if st and done(st):
            return st
        assert time.monotonic() < deadline, f"OTLP status never got there: {st}"
        await asyncio.sleep(0.05)


async def test_flows_arrive_as_otlp_log_records_and_the_deny_list_keeps_one_out(
        start_events: Starter, receiver: Receiver) -> None:
    events = await start_events(
        CILIATE_EVENTS_OTLP_ENDPOINT=receiver.url,  # no path: /v1/logs is added
        CILIATE_EVENTS_OTLP_HEADERS="x-scope-orgid=team%20a",
        CILIATE_EVENTS_OTLP_DENYLIST='[{"verdict": ["DROPPED"]}]',
        OTEL_BLRP_SCHEDULE_DELAY="50")
    await events.publish_flows("n1", FLOWS)
    await events.wait_seen(len(FLOWS))
    await receiver.until(2)
    st = await _otlp_status(events, lambda s: s["exported"] == 2 and s["skipped"] == 1)
    assert st["failed"] == 0 and st["queue_dropped"] == 0
    assert len(receiver.records) == 2  # f2 (DROPPED) was filtered out, not merely late

    assert receiver.headers[0]["x-scope-orgid"] == "team a"
    bodies = [json.loads(r["body"]) for r in receiver.records]
    assert [b["flow"]["uuid"] for b in bodies] == ["f1", "f3"]
    first = receiver.records[0]
    assert bodies[0]["flow"]["source"]["pod_name"] == "a"
    assert bodies[0]["flow"]["destination"]["labels"] == ["k8s:app=b"]
    assert bodies[0]["node_name"] == "n1"
    assert first["time"] == T0 + 1
    assert first["resource"]["service.name"] == "ciliate-events"
    assert first["attributes"] == {
        "cilium.event_kind": "flow/v1alpha2", "cilium.event_encoding": "JSON",
        "cilium.node_name": "n1", "cilium.flow.verdict": "FORWARDED",
        "cilium.flow.type": "L3_L4", "cilium.flow.traffic_direction": "INGRESS",
        "cilium.flow.source.namespace": "x", "cilium.flow.source.pod_name": "a",
        "cilium.flow.source.identity": 1001, "cilium.flow.destination.namespace": "y",
        "cilium.flow.destination.pod_name": "b", "cilium.flow.destination.identity": 1002,
        "cilium.flow.summary": "TCP Flags: SYN"}


async def test_field_mask_shapes_body_and_attributes(start_events: Starter,
                                                     receiver: Receiver) -> None:
    events = await start_events(
        CILIATE_EVENTS_OTLP_ENDPOINT=receiver.url + "/v1/logs",
        CILIATE_EVENTS_OTLP_ALLOWLIST='{"verdict": ["DROPPED"]}',
        CILIATE_EVENTS_OTLP_FIELDMASK="time,verdict,source.namespace",
        OTEL_BLRP_SCHEDULE_DELAY="50")
    await events.publish_flows("n1", FLOWS)
    await receiver.until(1)
    await _otlp_status(events, lambda s: s["exported"] == 1 and s["skipped"] == 2)
    (record,) = receiver.records
    assert json.loads(record["body"])["flow"] == {
        "time": "2023-11-14T22:13:20.000000002Z", "verdict": "DROPPED",
        "source": {"namespace": "x"}}
    assert {k: v for k, v in record["attributes"].items() if k.startswith("cilium.flow.")} == {
        "cilium.flow.verdict": "DROPPED", "cilium.flow.source.namespace": "x"}


async def test_a_refusing_collector_is_counted_and_never_stops_ingest(
        start_events: Starter, receiver: Receiver) -> None:
    events = await start_events(CILIATE_EVENTS_OTLP_ENDPOINT=receiver.url + "/refuse",
                                OTEL_BLRP_SCHEDULE_DELAY="50")
    await events.publish_flows("n1", FLOWS)
    st = await _otlp_status(events, lambda s: s["failed"] == 3 and s["failed_exports"] >= 1)
    assert st["exported"] == 0 and st["last_error"] and receiver.refused >= 1
    await events.publish_flows("n1", FLOWS)
    await events.wait_seen(2 * len(FLOWS))
    status, body = await events.get("/v1/flows", {"all": "true"})
    assert status == 200 and len(body["flows"]) == 2 * len(FLOWS)
    await _otlp_status(events, lambda s: s["failed"] == 6)
