"""Helpers shared by the k8s-sync integration tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from fake_apiserver import FakeApiServer

TOKEN = "k8s-sync-test-token"


async def wait_for(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@dataclass
class Cluster:
    api: FakeApiServer
    urls: dict[str, str]
    http: aiohttp.ClientSession

    async def rest(self, method: str, service: str, path: str, body: Any = None
                   ) -> tuple[int, Any]:
        async with self.http.request(method, self.urls[service] + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    async def stored(self, service: str, kind: str, namespace: str, name: str) -> Any:
        status, body = await self.rest("GET", service,
                                       f"/v1/resources/{kind}/{namespace or '_'}/{name}")
        return body if status == 200 else None

    async def sync_status(self) -> dict[str, Any]:
        _, body = await self.rest("GET", "k8s-sync", "/v1/k8s/status")
        return dict(body)


def write_kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kind-ciliate",
        "clusters": [{"name": "kind-ciliate", "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "kind-ciliate",
                      "context": {"cluster": "kind-ciliate", "user": "admin"}}],
    }))
    return path
