"""The security service end to end: REST apply -> SQL -> KV -> every agent loads -> kernel
enforces -> Tetragon events on ``process.<node>`` over a real nats-server. Processes run in a
pod cgroup under this test's own node subtree; everything made here is removed even on failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from ciliate.bus import Bucket, Bus
from ciliate.bus.subjects import process
from ciliate.config import Settings
from ciliate.runner import run_service
from ciliate.stack.ports import free_port

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF and cgroups"),
]

EXAMPLES = Path("/work/shared/examples")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified/ciliate")
TOKEN = "security-test-token"


def _kill_and_remove(cg: Path) -> None:
    if not cg.is_dir():
        return
    for child in [p for p in cg.iterdir() if p.is_dir()]:
        _kill_and_remove(child)
    for pid in (cg / "cgroup.procs").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    deadline = time.monotonic() + 5
    while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.01)
    cg.rmdir()


@pytest.fixture
def node() -> Iterator[str]:
    if not CGROUP_ROOT.parent.is_dir():
        pytest.skip("cgroup2 is not mounted at /sys/fs/cgroup/unified")
    name = f"sectest-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        _kill_and_remove(CGROUP_ROOT / name)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ciliate-secsvc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _wait(cond: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await cond()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Service:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    async def policy_state(self, key: str) -> str | None:
        _, status = await self.call("GET", "/v1/status")
        state: str | None = status.get("policies", {}).get(key)
        return state


@pytest.fixture
async def service(nats_url: str, sqlite_url: str, node: str, tmp_path: Path
                  ) -> AsyncIterator[Service]:
    from services.security.service import SPEC

    port = free_port("127.0.0.1")
    settings = Settings(nats_url=nats_url, db_url=sqlite_url, token=TOKEN, node=node,
                        state_dir=tmp_path, http_port=port)
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(SPEC, settings, stop))
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            svc = Service(base, session)

            async def ready() -> bool:
                assert not task.done(), f"service exited during start-up: {task}"
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    _, status = await svc.call("GET", "/v1/status")
                    return "cgroup" in status.get("agent", {})
                return False

            await _wait(ready, "the security agent to start")
            yield svc
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def in_cgroup(cg: Path, script: str) -> list[str]:
    return ["/bin/sh", "-c", f"echo $$ > {cg}/cgroup.procs && {script}"]


async def test_kill_tmp_exec_through_rest_reports_exec_and_sigkill_exit_on_the_bus(
    service: Service, bus: Bus, node: str, workdir: Path
) -> None:
    events: list[dict[str, Any]] = []
    lost: list[int] = []

    async def collect(batch: Any) -> None:
        events.extend(batch["items"])
        lost.append(batch["lost"])

    await bus.subscribe(process(node), collect)
    pod_cg = CGROUP_ROOT / node / "default.victim"
    pod_cg.mkdir()
    endpoints = await bus.kv(Bucket.ENDPOINTS)
    await endpoints.put("default.victim", {
        "id": 7, "namespace": "default", "name": "victim", "labels": ["k8s:app=victim"],
        "identity": 1000, "ips": ["10.244.9.9"], "node": node, "ports": [],
        "pod_labels": {"app": "victim"}, "ready": True,
    })

    doc = yaml.safe_load((EXAMPLES / "tracingpolicy-kill-tmp-exec.yaml").read_text())
    status, body = await service.call("POST", "/v1/resources", doc)
    assert status == 201, body

    async def loaded() -> bool:
        state = await service.policy_state("kill-tmp-exec")
        assert not (state or "").startswith("error"), state
        return state == "loaded"

    await _wait(loaded, "the policy to load on this node")
    stored = await (await bus.kv(Bucket.TRACINGPOLICIES)).get("kill-tmp-exec")
    assert stored is not None and stored.value["kind"] == "TracingPolicy"

    payload = workdir / "payload"
    shutil.copy("/usr/bin/touch", payload)
    env = shutil.which("env")
    assert env
    # Outside the node's subtree: neither enforced nor reported.
    outside_proc = await asyncio.create_subprocess_exec(env, str(payload),
                                                        str(workdir / "outside"))
    outside_pid = outside_proc.pid
    assert await asyncio.wait_for(outside_proc.wait(), 10) == 0
    assert (workdir / "outside").exists()
    inside = await asyncio.to_thread(
        subprocess.run, in_cgroup(pod_cg, f"{env} {payload} {workdir}/inside"), timeout=10)
    assert inside.returncode == 128 + 9
    assert not (workdir / "inside").exists()

    def exits() -> list[dict[str, Any]]:
        return [e["process_exit"] for e in events if "process_exit" in e
                and e["process_exit"]["process"].get("binary") == env]

    async def arrived() -> bool:
        return bool(exits())

    await _wait(arrived, "process_exit on the bus")
    (exit_event,) = exits()
    assert exit_event["signal"] == "SIGKILL"
    proc = exit_event["process"]
    assert proc["pod"]["namespace"] == "default" and proc["pod"]["name"] == "victim"
    assert proc["pod"]["pod_labels"] == {"app": "victim"}
    assert proc["arguments"] == f"{payload} {workdir}/inside"
    execs = [e for e in events if "process_exec" in e]
    assert [e["process_exec"]["process"]["exec_id"] for e in execs
            if e["process_exec"]["process"].get("binary") == env] == [proc["exec_id"]]
    exec_event = next(e for e in execs if e["process_exec"]["process"].get("binary") == env)
    assert exec_event["node_name"] == node and exec_event["time"].endswith("Z")
    for key in ("exec_id", "pid", "uid", "cwd", "binary", "arguments", "start_time"):
        assert key in exec_event["process_exec"]["process"]
    enforced = [e["process_tracepoint"] for e in events if "process_tracepoint" in e]
    assert [(t["policy_name"], t["action"], t["args"][0]["string_arg"]) for t in enforced] == [
        ("kill-tmp-exec", "KPROBE_ACTION_SIGKILL", str(payload))]
    assert all(e[k]["process"].get("pid") != outside_pid
               for e in events for k in e if k.startswith("process_"))
    assert sum(lost) == 0

    async def metrics_counted() -> bool:
        async with service.session.get(service.base + "/metrics") as resp:
            text = await resp.text()
        return ('tetragon_events_total{type="PROCESS_EXIT"}' in text
                and 'tetragon_policy_events_total{hook="syscalls/sys_enter_execve",'
                    'policy="kill-tmp-exec"} 1.0' in text)

    await _wait(metrics_counted, "metrics")

    # Deleting the policy unloads it everywhere: the same payload runs again.
    status, _ = await service.call("DELETE", "/v1/resources/TracingPolicy/_/kill-tmp-exec")
    assert status == 200

    async def unloaded() -> bool:
        return await service.policy_state("kill-tmp-exec") is None

    await _wait(unloaded, "the policy to unload")
    again = await asyncio.to_thread(
        subprocess.run, in_cgroup(pod_cg, f"{env} {payload} {workdir}/again"), timeout=10)
    assert again.returncode == 0 and (workdir / "again").exists()


async def test_kprobe_policy_is_refused_at_the_edge_and_nothing_is_stored(
    service: Service, bus: Bus, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from ciliate.client import ClientContext
    from ciliate.doctor.probes import kernel_features
    from services.security.cli import tracingpolicy

    if kernel_features().has("kprobe"):
        pytest.skip("this kernel has kprobes")
    doc = yaml.safe_load((EXAMPLES / "tracingpolicy-fd-install.yaml").read_text())
    status, body = await service.call("POST", "/v1/resources", doc)
    assert status == 422, body
    assert body["errors"][0]["field"] == "spec.kprobes[0]"
    assert "kprobe" in body["errors"][0]["message"]

    ClientContext(state_dir=str(tmp_path), nats_url=nats_url, token=TOKEN,
                  services={"security": [service.base]}).save()
    monkeypatch.setenv("CILIATE_STATE_DIR", str(tmp_path))
    runner = CliRunner()
    added = await asyncio.to_thread(
        runner.invoke, tracingpolicy, ["add", str(EXAMPLES / "tracingpolicy-fd-install.yaml")])
    assert added.exit_code == 1
    assert added.stderr.startswith("spec.kprobes[0]: kernel feature 'kprobe'")
    listed = await asyncio.to_thread(runner.invoke, tracingpolicy, ["list", "-o", "json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []
    assert await (await bus.kv(Bucket.TRACINGPOLICIES)).items() == {}
