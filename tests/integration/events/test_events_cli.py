"""``ciliate observe`` against a live events service: hubble's flags, -o json lines that parse
as GetFlowsResponse with Hubble's field names, --not, compact text, follow over SSE."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from click.testing import CliRunner, Result

from ciliate.flows import Endpoint, Flow, TCPFlag, TrafficDirection, Verdict, drop_flow_defaults
from services.events.cli import getevents, observe, ordered_filter_flags
from services.events.testing import EventsService

T0 = 1_700_000_000_000_000_000


def _flows() -> list[Flow]:
    a = Endpoint(id=11, identity=1001, namespace="x", pod_name="a", labels=["k8s:app=a"])
    b = Endpoint(id=12, identity=1002, namespace="y", pod_name="b", labels=["k8s:app=b"])
    fwd = Flow(time_ns=T0 + 1, uuid="u1", node_name="n1", verdict=Verdict.FORWARDED,
               traffic_direction=TrafficDirection.EGRESS, is_reply=False, ip_version=1,
               source_ip="10.0.1.1", destination_ip="10.0.2.1", protocol=6, source_port=34512,
               destination_port=80, tcp_flags=TCPFlag.SYN, source=a, destination=b,
               event_type=4)
    drop = drop_flow_defaults(Flow(
        time_ns=T0 + 2, uuid="u2", node_name="n1", traffic_direction=TrafficDirection.INGRESS,
        ip_version=1, source_ip="10.0.2.1", destination_ip="10.0.1.1", protocol=6,
        source_port=40000, destination_port=81, tcp_flags=TCPFlag.SYN, source=b,
        destination=a), 133)
    return [fwd, drop]


async def _invoke(events: EventsService, monkeypatch: pytest.MonkeyPatch, command: Any,
                  args: list[str]) -> Result:
    monkeypatch.setenv("CILIATE_STATE_DIR", str(events.state_dir))
    return await asyncio.to_thread(CliRunner().invoke, command, args, catch_exceptions=False)


def test_flags_keep_command_line_order() -> None:
    assert ordered_filter_flags(["--not", "--verdict", "DROPPED", "-o", "json", "--pod=x/a",
                                 "-n", "y", "--last", "3", "-t", "drop"]) == [
        ("not", ""), ("verdict", "DROPPED"), ("pod", "x/a"), ("namespace", "y"),
        ("type", "drop")]


async def test_observe_json_lines_are_get_flows_responses(
        events: EventsService, monkeypatch: pytest.MonkeyPatch) -> None:
    await events.publish_flows("n1", _flows())
    await events.wait_seen(2)
    result = await _invoke(events, monkeypatch, observe, ["-o", "json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["flow"]["uuid"] for line in lines] == ["u1", "u2"]
    drop = lines[1]
    assert set(drop) == {"flow", "node_name", "time"}
    flow = drop["flow"]
    assert flow["verdict"] == "DROPPED"
    assert flow["drop_reason_desc"] == "POLICY_DENIED"
    assert flow["Type"] == "L3_L4"
    assert flow["event_type"] == {"type": 1, "sub_type": 133}
    assert flow["IP"] == {"source": "10.0.2.1", "destination": "10.0.1.1", "ipVersion": "IPv4"}
    assert flow["l4"] == {"TCP": {"source_port": 40000, "destination_port": 81,
                                  "flags": {"SYN": True}}}
    assert flow["source"] == {"ID": 12, "identity": 1002, "namespace": "y",
                              "labels": ["k8s:app=b"], "pod_name": "b"}
    assert flow["traffic_direction"] == "INGRESS"
    assert flow["node_name"] == "n1"
    assert flow["Summary"] == "TCP Flags: SYN"
    assert flow["time"] == drop["time"] == "2023-11-14T22:13:20.000000002Z"


async def test_observe_filters_not_and_compact(events: EventsService,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    await events.publish_flows("n1", _flows())
    await events.wait_seen(2)
    result = await _invoke(events, monkeypatch, observe, ["--not", "--verdict", "DROPPED"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "Nov 14 22:13:20.000: x/a:34512 (ID:1001) -> y/b:80 (ID:1002) to-endpoint FORWARDED "
        "(TCP Flags: SYN)"]
    assert "u2" not in result.output and "DROPPED" not in result.output
    result = await _invoke(events, monkeypatch, observe,
                           ["--from-pod", "y/b", "--verdict", "DROPPED", "-o", "compact"])
    assert result.output.splitlines() == [
        "Nov 14 22:13:20.000: y/b:40000 (ID:1002) <> x/a:81 (ID:1001) Policy denied DROPPED "
        "(TCP Flags: SYN)"]
    result = await _invoke(events, monkeypatch, observe, ["--last", "1", "-o", "table"])
    assert result.output.splitlines()[0].split()[:3] == ["TIMESTAMP", "SOURCE", "DESTINATION"]
    assert len(result.output.splitlines()) == 2
    bad = await _invoke(events, monkeypatch, observe, ["--identity", "not-an-identity"])
    assert bad.exit_code == 2


async def test_observe_follow_prints_new_flows(events: EventsService,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """-f over SSE: the CLI prints flows published after it started, then we stop it."""
    monkeypatch.setenv("CILIATE_STATE_DIR", str(events.state_dir))
    printed: list[str] = []
    started = threading.Event()

    import services.events.cli as cli

    original = cli.FlowPrinter.__call__

    def record(self: cli.FlowPrinter, w: dict[str, Any]) -> None:
        original(self, w)
        printed.append(w["u"])
        if len(printed) == 1:
            raise KeyboardInterrupt  # the user's Ctrl-C after the first flow

    monkeypatch.setattr(cli.FlowPrinter, "__call__", record)

    def run() -> Result:
        started.set()
        return CliRunner().invoke(observe, ["-f", "--verdict", "DROPPED", "-o", "json"],
                                  catch_exceptions=False)

    task = asyncio.create_task(asyncio.to_thread(run))
    await asyncio.to_thread(started.wait, 10)
    await events.wait_followers(1)
    async with asyncio.timeout(15):
        await events.publish_flows("n1", _flows())
        result = await task
    assert printed == ["u2"]
    assert json.loads(result.output.splitlines()[0])["flow"]["uuid"] == "u2"


async def test_getevents_prints_tetragon_json(events: EventsService,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    event = {"process_exec": {"process": {"binary": "/usr/bin/curl", "arguments": "-s x",
                                          "pod": {"namespace": "x", "name": "a"}}},
             "node_name": "n1", "time": "2023-11-14T22:13:20Z"}
    await events.publish_events("n1", [event])
    await events.wait_seen(1, stream="process")
    result = await _invoke(events, monkeypatch, getevents, ["--no-follow", "-o", "json"])
    assert [json.loads(line) for line in result.output.splitlines()] == [event]
    result = await _invoke(events, monkeypatch, getevents, ["--no-follow", "-o", "compact"])
    assert result.output.strip() == "🚀 process x/a /usr/bin/curl -s x"


async def test_getevents_filters_by_policy_and_repeated_pods(
        events: EventsService, monkeypatch: pytest.MonkeyPatch) -> None:
    def tracepoint(pod: str, policy: str) -> dict[str, Any]:
        return {"process_tracepoint": {
            "process": {"binary": "/bin/cat", "pod": {"namespace": "x", "name": pod}},
            "subsys": "syscalls", "event": "sys_enter_openat", "policy_name": policy,
            "action": "KPROBE_ACTION_POST"}, "node_name": "n1", "time": "2023-11-14T22:13:20Z"}

    sample = [tracepoint("a", "watch-etc"), tracepoint("b", "other"), tracepoint("c", "watch-etc")]
    await events.publish_events("n1", sample)
    await events.wait_seen(3, stream="process")
    result = await _invoke(events, monkeypatch, getevents,
                           ["--no-follow", "--policy-names", "watch-etc", "-o", "json"])
    assert [json.loads(line) for line in result.output.splitlines()] == [sample[0], sample[2]]
    result = await _invoke(events, monkeypatch, getevents,
                           ["--no-follow", "--pod", "a", "--pod", "b", "-o", "compact"])
    assert result.output.splitlines() == [
        "⁉️ tracepoint x/a /bin/cat syscalls sys_enter_openat",
        "⁉️ tracepoint x/b /bin/cat syscalls sys_enter_openat",
    ]
