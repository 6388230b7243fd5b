"""``ciliate monitor`` against a real nats-server: batches published as the agent does
(``BatchPublisher`` on ``flows.<node>``) come out as cilium monitor lines, filtered by type."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from ciliate.bus import BatchPublisher, Bus, subjects
from ciliate.client import ClientContext
from ciliate.flows import pack_envelope
from ciliate.flows.tables import DropReason, MessageType, TraceReason, TrafficDirection, Verdict
from ciliate.stack.nats import NatsServer
from services.datapath.cli import monitor
from services.datapath.core.events import decode_event, encode_event
from services.datapath.core.flows import FlowContext, event_to_flow

CTX = FlowContext.build("node-1", [
    {"id": 1234, "identity": 256, "namespace": "x", "name": "a", "ips": ["10.244.0.2"]},
    {"id": 2345, "identity": 257, "namespace": "y", "name": "b", "ips": ["10.244.1.3"]},
], [])


def record(kind: MessageType, verdict: Verdict, reason: int) -> dict[str, Any]:
    raw = encode_event(type=kind, verdict=verdict, drop_reason=reason, src_identity=256,
                       dst_identity=257, src_ip="10.244.0.2", dst_ip="10.244.1.3",
                       src_port=40000, dst_port=80, proto=6, tcp_flags=0x02,
                       direction=TrafficDirection.INGRESS, endpoint_id=2345,
                       trace_reason=0 if kind == MessageType.DROP else TraceReason.NEW)
    return event_to_flow(decode_event(raw), CTX).to_wire()


ITEMS = [
    record(MessageType.TRACE, Verdict.FORWARDED, 0),
    record(MessageType.POLICY_VERDICT, Verdict.FORWARDED, 0),
    record(MessageType.DROP, Verdict.DROPPED, DropReason.POLICY_DENIED),
]


async def run_monitor(server: NatsServer, state: Path, args: list[str]) -> Result:
    """Invoke the command in a thread; publish agent-style batches until it has printed its
    ``--max-events`` and exits (its subscription starts at an unknown moment)."""
    ClientContext(state_dir=str(state), nats_url=server.url, token="t").save()
    runner = CliRunner()
    task = asyncio.create_task(asyncio.to_thread(
        runner.invoke, monitor, args, env={"CILIATE_STATE_DIR": str(state)}))
    bus = await Bus.connect(server.url, name="test-agent")
    try:
        pub = BatchPublisher(bus, subjects.flows("node-1"), source="node-1",
                               encode=pack_envelope)
        deadline = time.monotonic() + 15
        while not task.done():
            assert time.monotonic() < deadline, "monitor did not print its events"
            pub.lost(2)
            for item in ITEMS:
                pub.add(item)
            await pub.flush()
            await asyncio.wait({task}, timeout=0.05)
    finally:
        await bus.close()
    return task.result()


async def test_monitor_prints_drops_only(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        result = await run_monitor(server, tmp_path, ["--type", "drop", "--max-events", "2"])
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Lost 2 events (node node-1)"
    assert lines[1].startswith("xx drop (Policy denied) flow 0x")
    assert lines[1].endswith("to endpoint 2345, ifindex 0, identity 256->257: "
                             "10.244.0.2:40000 -> 10.244.1.3:80 tcp SYN")
    assert len(lines) == 2


async def test_monitor_json_stream(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        result = await run_monitor(server, tmp_path, ["-o", "json", "--type", "trace",
                                                      "--type", "policy-verdict",
                                                      "--max-events", "3"])
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    objs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["type"] for o in objs] == ["lost", "trace", "policy-verdict"]
    assert objs[1]["state"] == "new" and objs[1]["traceSummary"] == "-> endpoint 2345"
    assert objs[2]["action"] == "allow" and objs[2]["remoteLabel"] == 256


def test_monitor_without_a_stack_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(monitor, ["--max-events", "1"],
                                env={"CILIATE_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert "no running stack" in result.output
