"""The embedded stack: `ciliate up` brings every service up; status, apply and recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.stack.supervisor import Stack, StackConfig

NON_AGENTS = ("identity", "policy", "lb", "events")


def ciliate(state_dir: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CILIATE_STATE_DIR": str(state_dir)}
    return subprocess.run([sys.executable, "-m", "ciliate", *args], env=env, text=True,
                          capture_output=True, timeout=60, check=check)


def status(state_dir: Path) -> dict[str, Any] | None:
    result = ciliate(state_dir, "status", "-o", "json")
    try:
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed
    except json.JSONDecodeError:
        return None


def wait_healthy(state_dir: Path, deadline: float) -> dict[str, Any]:
    last = None
    while time.monotonic() < deadline:
        last = status(state_dir)
        if last is not None and last["healthy"]:
            return last
        time.sleep(0.2)
    raise AssertionError(f"stack not healthy before the deadline: {last}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    config = StackConfig(state_dir=tmp_path / "state", services=NON_AGENTS,
                         replicas={"identity": 2})
    s = Stack(config)
    try:
        s.start()
        assert s.wait_ready(60), s.ready()
        yield s
    finally:
        s.stop()


def test_status_lists_every_replica(stack: Stack) -> None:
    report = wait_healthy(stack.state_dir, time.monotonic() + 30)
    assert set(report["services"]) == set(NON_AGENTS)
    assert len(report["services"]["identity"]["replicas"]) == 2
    assert all(r["healthy"] for e in report["services"].values() for r in e["replicas"])


def test_apply_routes_kinds_to_their_owners(stack: Stack, shared_dir: Path) -> None:
    result = ciliate(stack.state_dir, "apply", "-f",
                     str(shared_dir / "conformance/netpol/world.yaml"))
    assert result.returncode == 0, result.stderr
    assert "pod/x/a created" in result.stdout
    policy = shared_dir / "conformance/netpol/cases/01-default-deny-ingress.yaml"
    assert ciliate(stack.state_dir, "apply", "-f", str(policy)).returncode == 0
    pods = json.loads(ciliate(stack.state_dir, "get", "pods", "-n", "x", "-o", "json").stdout)
    assert sorted(p["metadata"]["name"] for p in pods["items"]) == ["a", "b", "c"]
    netpols = json.loads(ciliate(stack.state_dir, "get", "netpol", "-o", "json").stdout)
    assert len(netpols["items"]) >= 1


def test_bad_file_changes_nothing(stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: fine}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: fine}\n"
        "spec: {ports: [{port: 80, protocol: HTTP}]}\n"
    )
    result = ciliate(stack.state_dir, "apply", "-f", str(bad))
    assert result.returncode == 1
    assert "spec.ports[0].protocol" in result.stderr
    listed = json.loads(ciliate(stack.state_dir, "get", "ns", "-o", "json").stdout)
    assert "fine" not in [n["metadata"]["name"] for n in listed["items"]]


def test_services_recover_from_a_nats_restart(stack: Stack) -> None:
    wait_healthy(stack.state_dir, time.monotonic() + 30)
    stack.nats.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and all(stack.ready().values()):
        time.sleep(0.05)
    assert not all(stack.ready().values()), "readiness never noticed NATS was gone"
    stack.nats.start()
    report = wait_healthy(stack.state_dir, time.monotonic() + 60)
    assert set(report["services"]) == set(NON_AGENTS)
    assert all(c.proc is not None and c.proc.poll() is None for c in stack.children), \
        "a service had to be restarted"


def test_ciliate_up_runs_in_the_foreground_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    state = tmp_path / "up"
    env = {**os.environ, "CILIATE_STATE_DIR": str(state)}
    proc = subprocess.Popen([sys.executable, "-m", "ciliate", "up", "--no-agents"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(state, time.monotonic() + 60)
        context = state / "context.json"
        assert context.stat().st_mode & 0o777 == 0o600
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "ready in" in out
        assert not context.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
