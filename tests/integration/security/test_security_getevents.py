"""`ciliate getevents` against a real nats-server: batches on process.<node> printed one JSON
object per line or as compact lines, filtered by the flags, losses reported on stderr."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ciliate.bus import Bus, codec
from ciliate.client import ClientContext

EXEC = {"process_exec": {"process": {
    "exec_id": "bjE6MTox", "pid": 42, "uid": 0, "cwd": "/", "binary": "/usr/bin/curl",
    "arguments": "https://ebpf.io", "start_time": "2024-01-01T00:00:00.000000000Z",
    "pod": {"namespace": "x", "name": "a"}}}, "node_name": "n1",
    "time": "2024-01-01T00:00:00.000000000Z"}
OTHER = {"process_exec": {"process": {"pid": 43, "binary": "/bin/ls",
                                      "pod": {"namespace": "y", "name": "b"}}},
         "node_name": "n2", "time": "2024-01-01T00:00:01.000000000Z"}


@pytest.fixture
def context(tmp_path: Path, nats_url: str, monkeypatch: pytest.MonkeyPatch) -> ClientContext:
    ctx = ClientContext(state_dir=str(tmp_path), nats_url=nats_url, token="t")
    ctx.save()
    monkeypatch.setenv("CILIATE_STATE_DIR", str(tmp_path))
    return ctx


async def _run_while_publishing(bus: Bus, args: list[str]) -> Any:
    from services.security.cli import getevents

    runner = CliRunner()
    job = asyncio.ensure_future(asyncio.to_thread(runner.invoke, getevents, args))
    payload = codec.pack({"source": "n1", "items": [EXEC], "lost": 0})
    other = codec.pack({"source": "n2", "items": [OTHER], "lost": 3})
    while not job.done():  # until the command's subscription exists, messages go nowhere
        await bus.publish_raw("process.n1", payload)
        await bus.publish_raw("process.n2", other)
        await asyncio.sleep(0.05)
    return job.result()


async def test_json_lines_filtered_by_namespace(context: ClientContext, bus: Bus) -> None:
    result = await _run_while_publishing(bus, ["-o", "json", "--namespace", "x",
                                               "--timeout", "1"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines and all(line == EXEC for line in lines)
    assert "lost 3 events on n2" in result.stderr


async def test_compact_lines_with_process_filter(context: ClientContext, bus: Bus) -> None:
    result = await _run_while_publishing(bus, ["-o", "compact", "--process", "ls$",
                                               "--timeout", "1"])
    assert result.exit_code == 0, result.output
    lines = set(result.stdout.splitlines())
    assert lines == {"🚀 process y/b /bin/ls"}
