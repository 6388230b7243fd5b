"""Helpers for the policy integration tests: REST and KV access to an in-process policy
service, and a stand-in for the identity service (KV ``identities``/``endpoints`` and
``identity.allocate``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ciliate.bus import Bucket, Bus
from ciliate.bus.subjects import IDENTITY_ALLOCATE
from ciliate.labels import CIDR_IDENTITY_BASE
from ciliate.resources.loader import load_resources
from services.policy.core.world import World, build_world

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared" / "conformance" / "netpol"
TOKEN = "test-token"


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float = 10.0,
                   what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


@dataclass
class FakeIdentity:
    """Answers ``identity.allocate`` for CIDR labels and publishes the identities, as the
    identity service does; records every request."""

    bus: Bus
    requests: list[Any] = field(default_factory=list)
    assigned: dict[str, int] = field(default_factory=dict)

    async def handle(self, payload: Any) -> Any:
        self.requests.append(payload)
        kv = await self.bus.kv(Bucket.IDENTITIES)
        ids = []
        for labels in payload["labels"]:
            key = ";".join(sorted(labels))
            ident = self.assigned.setdefault(key, CIDR_IDENTITY_BASE + 1 + len(self.assigned))
            await kv.put(str(ident), {"id": ident, "labels": sorted(labels)})
            ids.append(ident)
        return {"ids": ids}


@dataclass
class PolicyStack:
    bus: Bus
    base_url: str
    session: aiohttp.ClientSession
    identity: FakeIdentity
    nats_url: str = ""

    async def rest(self, method: str, path: str, body: Any = None,
                   params: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.request(method, self.base_url + path, json=body,
                                        params=params) as resp:
            return resp.status, await resp.json(content_type=None)

    async def policy_kv(self) -> dict[str, Any]:
        return await (await self.bus.kv(Bucket.POLICY)).items()

    async def serve_allocate(self) -> None:
        await self.bus.serve(IDENTITY_ALLOCATE, self.identity.handle)

    async def publish_world(self, world: World) -> None:
        """Identities and endpoints of an offline world, as the identity service would."""
        ident_kv = await self.bus.kv(Bucket.IDENTITIES)
        ep_kv = await self.bus.kv(Bucket.ENDPOINTS)
        for ident, labels in sorted(world.identities.items()):
            await ident_kv.put(str(ident), {"id": ident, "labels": labels.sorted_strings()})
        for i, pod in enumerate(sorted(world.pods.values(), key=lambda p: p.key)):
            ports = [{"name": name, "port": number,
                      "protocol": {6: "TCP", 17: "UDP", 132: "SCTP"}[proto]}
                     for (name, proto), numbers in sorted(pod.named_ports.items())
                     for number in sorted(numbers)]
            await ep_kv.put(f"{pod.namespace}.{pod.name}", {
                "id": i + 1, "namespace": pod.namespace, "name": pod.name,
                "labels": pod.labels.sorted_strings(), "identity": pod.identity,
                "ips": [f"10.244.1.{10 + i}"], "node": "n1", "ports": ports,
                "pod_labels": {}, "ready": True,
            })

    async def status(self) -> dict[str, Any]:
        _, body = await self.rest("GET", "/v1/status")
        return body  # type: ignore[no-any-return]


def conformance_world() -> World:
    return build_world(load_resources((SHARED / "world.yaml").read_bytes()))


StackFactory = Callable[..., Awaitable[PolicyStack]]


