"""The embedded stack as the reliability tests drive it: start, REST, CLI, RSS, supervision.

Everything here talks to real child processes (``Stack``), so a crash, a leak or a 5xx is the
service's own, not the test harness's.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from ciliate.stack.supervisor import Child, Stack, StackConfig

NON_AGENTS = ("identity", "policy", "lb", "events")
AGENTS = ("datapath", "security")
"""Per-node agents: started only as root (BPF, network namespaces, cgroups)."""
OPEN_ROUTES = {("GET", "/healthz"), ("GET", "/readyz")}
UI_ROUTES = {("GET", "/ui"), ("GET", "/ui/"), ("GET", "/ui/{name}")}
"""The events UI's static files are open by design (no data; the page's API calls carry the
token); their handler serves a fixed list of file names."""


def start_stack(state_dir: Path, *, replicas: dict[str, int] | None = None,
                db_url: str | None = None, services: tuple[str, ...] = NON_AGENTS,
                agents: bool = False) -> Stack:
    """A started, ready embedded stack (per-service NATS users, bearer token)."""
    stack = Stack(StackConfig(state_dir=state_dir, services=services, replicas=replicas or {},
                              db_url=db_url, agents=agents))
    try:
        stack.start()
        if not stack.wait_ready(90):
            raise AssertionError(f"stack not ready: {stack.ready()}")
    except BaseException:
        stack.stop()
        raise
    return stack


def children(stack: Stack, service: str) -> list[Child]:
    return [c for c in stack.children if c.service == service]


def url_of(stack: Stack, service: str) -> str:
    return children(stack, service)[0].url


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from ``/proc`` (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def pids(stack: Stack) -> dict[str, int]:
    return {f"{c.service}/{c.replica}": c.proc.pid for c in stack.children if c.proc is not None}


def cli(state_dir: Path, *args: str, stdin: bytes | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "CILIATE_STATE_DIR": str(state_dir)}
    return subprocess.run([sys.executable, "-m", "ciliate", *args], env=env, input=stdin,
                          capture_output=True, timeout=timeout, check=False)


def status_json(state_dir: Path) -> dict[str, Any] | None:
    result = cli(state_dir, "status", "-o", "json")
    try:
        parsed: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        return None
    return parsed


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float,
                   what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Rest:
    """An authenticated aiohttp session against the stack's services."""

    def __init__(self, stack: Stack, timeout: float = 30.0) -> None:
        self.stack = stack
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {stack.token}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def __aenter__(self) -> Rest:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.session.close()

    async def call(self, method: str, url: str, body: Any = None, *,
                   data: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if data is not None:
            kwargs["data"] = io.BytesIO(data)
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, url, **kwargs) as resp:
            raw = await resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, raw.decode("utf-8", "replace")

    async def apply(self, service: str, doc: dict[str, Any], replica: int = 0) -> tuple[int, Any]:
        url = children(self.stack, service)[replica].url
        return await self.call("POST", url + "/v1/resources", doc)


def pod(namespace: str, name: str, app: str = "web", node: str = "node-1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"nodeName": node,
                     "containers": [{"name": "c", "image": "nginx",
                                     "ports": [{"containerPort": 80}]}]}}


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


METHODS = ("get", "post", "put", "patch", "delete")


def concrete(path: str) -> str:
    """An OpenAPI path with every ``{param}`` filled in."""
    return re.sub(r"\{[^}]+\}", "x", path)


async def operations(rest: Rest, base: str) -> dict[tuple[str, str], bool]:
    """Every documented operation, and whether the document declares it open."""
    status, doc = await rest.call("GET", base + "/openapi.json")
    assert status == 200, doc
    return {(method.upper(), path): op.get("security") == []
            for path, item in doc["paths"].items()
            for method, op in item.items() if method in METHODS}


async def walk_routes(stack: Stack, service: str,
                      allowed_open: set[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Call every operation of the service's OpenAPI document without the token, with a wrong
    one and with one lacking ``Bearer``: 401 problem documents, except ``allowed_open``, which
    must be exactly the operations the document declares open. Returns the operations."""
    base = children(stack, service)[0].url
    async with Rest(stack) as rest, aiohttp.ClientSession() as anonymous:
        ops = await operations(rest, base)
        assert {op for op, is_open in ops.items() if is_open} == allowed_open
        for method, path in ops:
            for headers in ({}, {"Authorization": "Bearer wrong"},
                            {"Authorization": stack.token}):
                async with anonymous.request(method, base + concrete(path), headers=headers,
                                             json={}) as resp:
                    if (method, path) in allowed_open:
                        assert resp.status in (200, 404, 503), (method, path, resp.status)
                    else:
                        assert resp.status == 401, (service, method, path, headers,
                                                    resp.status)
                        assert resp.content_type == "application/problem+json"
    return ops
