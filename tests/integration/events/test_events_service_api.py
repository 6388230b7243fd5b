"""Flows and process events injected on NATS come out of the events service's REST, SSE and
websocket API exactly as Hubble's filter semantics say; metrics, loss and export follow."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ciliate.flows import (
    Endpoint,
    Flow,
    MessageType,
    TCPFlag,
    TrafficDirection,
    Verdict,
    drop_flow_defaults,
    rfc3339,
    trace_flow_defaults,
)
from services.events.core.cliflags import filters_from_flags
from services.events.testing import EventsService, Starter

T0 = 1_700_000_000_000_000_000
IDS = {"a": 1001, "b": 1002, "c": 1003}
IPS = {"x/a": "10.0.1.1", "y/b": "10.0.2.1", "z/c": "10.0.3.1"}


def _ep(ref: str) -> Endpoint:
    ns, pod = ref.split("/")
    return Endpoint(id=IDS[pod], identity=IDS[pod], namespace=ns, pod_name=pod,
                    labels=[f"k8s:app={pod}", f"k8s:io.kubernetes.pod.namespace={ns}"])


def _flow(uuid: str, t: int, node: str, src: str, dst: str, dport: int, *, proto: int = 6,
          drop: int = 0, kind: MessageType = MessageType.TRACE) -> Flow:
    f = Flow(time_ns=T0 + t, uuid=uuid, node_name=node, verdict=Verdict.FORWARDED,
             traffic_direction=TrafficDirection.INGRESS, is_reply=False, ip_version=1,
             source_ip=IPS[src], destination_ip=IPS[dst], protocol=proto, source_port=40000 + t,
             destination_port=dport, tcp_flags=TCPFlag.SYN if proto == 6 else 0,
             source=_ep(src), destination=_ep(dst))
    if drop:
        return drop_flow_defaults(f, drop)
    if kind == MessageType.TRACE:
        return trace_flow_defaults(f, 0)
    f.event_type = kind
    return f


WORLD = [
    _flow("f1", 1, "n1", "x/a", "y/b", 80),
    _flow("f2", 2, "n2", "x/a", "z/c", 81, drop=133),
    _flow("f3", 3, "n1", "y/b", "x/a", 53, proto=17),
    _flow("f4", 4, "n2", "z/c", "y/b", 80, drop=181),
    _flow("f5", 5, "n1", "y/b", "z/c", 80, kind=MessageType.POLICY_VERDICT),
]

CASES: list[tuple[list[tuple[str, str]], list[str]]] = [
    ([], ["f1", "f2", "f3", "f4", "f5"]),
    ([("verdict", "DROPPED")], ["f2", "f4"]),
    ([("verdict", "DROPPED"), ("verdict", "FORWARDED")], ["f1", "f2", "f3", "f4", "f5"]),
    ([("pod", "x/a")], ["f1", "f2", "f3"]),
    ([("from-pod", "x/a"), ("verdict", "DROPPED")], ["f2"]),
    ([("namespace", "y")], ["f1", "f3", "f4", "f5"]),
    ([("not", ""), ("verdict", "DROPPED")], ["f1", "f3", "f5"]),
    ([("to-port", "80"), ("not", ""), ("from-namespace", "z")], ["f1", "f5"]),
    ([("protocol", "udp")], ["f3"]),
    ([("node-name", "n2")], ["f2", "f4"]),
    ([("label", "app=b")], ["f1", "f3", "f4", "f5"]),
    ([("type", "drop")], ["f2", "f4"]),
    ([("type", "policy-verdict"), ("type", "trace")], ["f1", "f3", "f5"]),
    ([("to-identity", "1003")], ["f2", "f5"]),
    ([("ip", "10.0.3.1")], ["f2", "f4", "f5"]),
    ([("drop-reason-desc", "POLICY_DENY")], ["f4"]),
    ([("from-namespace", "x"), ("from-namespace", "z"), ("to-port", "80")], ["f1", "f4"]),
]


def _filter_params(flags: list[tuple[str, str]]) -> dict[str, str]:
    white, black = filters_from_flags(flags)
    params = {"all": "true"}
    if white:
        params["whitelist"] = json.dumps([f.to_json() for f in white])
    if black:
        params["blacklist"] = json.dumps([f.to_json() for f in black])
    return params


async def _inject_world(events: EventsService) -> None:
    for node in ("n1", "n2"):
        await events.publish_flows(node, [f for f in WORLD if f.node_name == node])
    await events.wait_seen(len(WORLD))


async def test_every_filter_returns_exactly_the_expected_flows_merged_by_time(
        events: EventsService) -> None:
    await _inject_world(events)
    for flags, expected in CASES:
        status, body = await events.get("/v1/flows", _filter_params(flags))
        assert status == 200, (flags, body)
        uuids = [r["flow"]["uuid"] for r in body["flows"]]
        assert uuids == expected, flags


async def test_first_last_since_until_and_nodes(events: EventsService) -> None:
    await _inject_world(events)

    async def uuids(params: dict[str, str]) -> list[str]:
        status, body = await events.get("/v1/flows", params)
        assert status == 200, body
        return [r["flow"]["uuid"] for r in body["flows"]]

    assert await uuids({"last": "2"}) == ["f4", "f5"]
    assert await uuids({"first": "2"}) == ["f1", "f2"]
    assert await uuids({"since": rfc3339(T0 + 2), "until": rfc3339(T0 + 4)}) == [
        "f2", "f3", "f4"]
    assert await uuids({"all": "true", "node": "n2"}) == ["f2", "f4"]


async def test_bad_parameters_are_400s_naming_the_parameter(events: EventsService) -> None:
    for params, field in (
        ({"whitelist": '[{"verdict": ["NOPE"]}]'}, "whitelist"),
        ({"blacklist": "[not json"}, "blacklist"),
        ({"whitelist": '[{"no_such_field": ["x"]}]'}, "whitelist"),
        ({"since": "yesterday-ish"}, "since"),
        ({"first": "2", "last": "3"}, "first"),
        ({"last": "-1"}, "last"),
    ):
        status, body = await events.get("/v1/flows", params)
        assert status == 400, params
        assert body["errors"][0]["field"] == field, params


async def test_follow_over_sse_receives_new_matching_flows(events: EventsService) -> None:
    params = {"follow": "true", **_filter_params([("verdict", "DROPPED")])}
    params.pop("all")
    async with events.session.get(events.base + "/v1/flows", params=params,
                                  headers=events.auth) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert (await resp.content.readline()).startswith(b": stream open")
        await events.publish_flows("n1", WORLD[:3])
        received: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            async for raw in resp.content:
                if raw.startswith(b"data: "):
                    received.append(json.loads(raw[6:]))
                    break
        assert [r["flow"]["uuid"] for r in received] == ["f2"]
        assert received[0]["flow"]["verdict"] == "DROPPED"


async def test_follow_over_websocket(events: EventsService) -> None:
    params = {"whitelist": json.dumps([{"source_pod": ["y/"]}])}
    async with events.session.ws_connect(events.base + "/v1/flows/ws", params=params,
                                         headers=events.auth) as ws:
        await events.publish_flows("n1", WORLD)
        async with asyncio.timeout(10):
            first = json.loads((await ws.receive()).data)
            second = json.loads((await ws.receive()).data)
    assert [first["flow"]["uuid"], second["flow"]["uuid"]] == ["f3", "f5"]


async def test_websocket_and_api_need_the_token(events: EventsService) -> None:
    async with events.session.get(events.base + "/v1/flows") as resp:
        assert resp.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError):
        async with events.session.ws_connect(events.base + "/v1/flows/ws"):
            pass
    async with events.session.get(events.base + "/ui/") as resp:
        assert resp.status == 200
        assert "<html" in (await resp.text()).lower()


async def test_metrics_use_hubbles_names(events: EventsService) -> None:
    await _inject_world(events)
    async with events.session.get(events.base + "/metrics", headers=events.auth) as resp:
        text = await resp.text()
    lines = text.splitlines()

    def value(name: str, *labels: str) -> float:
        for line in lines:
            if line.startswith(name + "{") and all(lb in line for lb in labels):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} {labels} not in /metrics")

    assert value("hubble_flows_processed_total", 'type="Drop"', 'verdict="DROPPED"') == 2
    assert value("hubble_flows_processed_total", 'type="Trace"', 'verdict="FORWARDED"') == 2
    assert value("hubble_drop_total", 'reason="POLICY_DENIED"', 'protocol="TCP"') == 1
    assert value("hubble_drop_total", 'reason="POLICY_DENY"', 'protocol="TCP"') == 1


async def test_ring_overrun_and_upstream_loss_are_lost_events(start_events: Starter) -> None:
    events = await start_events(CILIATE_EVENTS_RING_SIZE="3",
                                CILIATE_HUBBLE_METRICS="flow drop")
    one_node = [_flow(f"g{i}", i, "n1", "x/a", "y/b", 80) for i in range(1, 6)]
    await events.publish_flows("n1", one_node, lost=7)
    await events.wait_seen(6)
    status, body = await events.get("/v1/flows", {"first": "2"})
    assert status == 200
    lost = body["flows"][0]["lost_events"]
    assert lost["source"] == "HUBBLE_RING_BUFFER"
    assert lost["num_events_lost"] == "3"
    assert body["flows"][1]["flow"]["uuid"] == "g4"
    status, body = await events.get("/v1/flows", {"last": "1"})
    upstream = body["flows"][0]["lost_events"]
    assert (upstream["source"], upstream["num_events_lost"]) == ("PERF_EVENT_RING_BUFFER", "7")
    async with events.session.get(events.base + "/metrics", headers=events.auth) as resp:
        assert 'hubble_lost_events_total{source="perf_event_ring_buffer"} 7.0' in await resp.text()


def _exec(ns: str, pod: str, binary: str, t: int) -> dict[str, Any]:
    return {"process_exec": {"process": {
        "exec_id": f"bjE6{t}", "pid": 100 + t, "uid": 0, "cwd": "/", "binary": binary,
        "arguments": "-s", "start_time": rfc3339(T0 + t),
        "pod": {"namespace": ns, "name": pod}}}, "node_name": "n1", "time": rfc3339(T0 + t)}


async def test_process_events_filtered_and_followed(events: EventsService) -> None:
    await events.publish_events("n1", [_exec("x", "a", "/usr/bin/curl", 1),
                                       _exec("y", "b", "/bin/sh", 2)])
    await events.wait_seen(2, stream="process")
    status, body = await events.get("/v1/events", {"namespace": "x", "all": "true"})
    assert status == 200
    assert [e["process_exec"]["process"]["binary"] for e in body["events"]] == ["/usr/bin/curl"]
    assert "t" not in body["events"][0]
    status, body = await events.get("/v1/events", {"process": "sh$", "all": "true"})
    assert [e["process_exec"]["process"]["pod"]["name"] for e in body["events"]] == ["b"]
    status, body = await events.get("/v1/events", {"event_type": "process_nope"})
    assert status == 400 and body["errors"][0]["field"] == "event_type"


async def test_export_writes_allowed_flows_with_the_field_mask(start_events: Starter,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "export" / "flows.log"
    events = await start_events(
        CILIATE_EVENTS_EXPORT_FILE=str(path),
        CILIATE_EVENTS_EXPORT_ALLOWLIST='[{"verdict": ["DROPPED"]}]',
        CILIATE_EVENTS_EXPORT_DENYLIST='{"destination_pod": ["y/"]}',
        CILIATE_EVENTS_EXPORT_FIELDMASK="time,verdict,source.namespace")
    await _inject_world(events)
    deadline = time.monotonic() + 10
    while not (path.exists() and path.read_text().count("\n") >= 1):
        assert time.monotonic() < deadline, "nothing exported"
        await asyncio.sleep(0.02)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["flow"] for line in lines] == [
        {"time": rfc3339(T0 + 2), "verdict": "DROPPED", "source": {"namespace": "x"}}]
