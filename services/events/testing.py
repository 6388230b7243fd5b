"""The events service in-process (``run_service``) for tests and benchmarks, with helpers that
inject records the way the datapath and security agents publish them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ciliate.bus import BatchPublisher, Bus
from ciliate.bus.subjects import flows, process
from ciliate.client import ClientContext
from ciliate.config import Settings
from ciliate.flows import Flow, pack_envelope
from ciliate.runner import run_service
from ciliate.stack.ports import free_port
from services.events.service import SPEC

TOKEN = "events-test-token"


@dataclass
class EventsService:
    base: str
    bus: Bus
    session: aiohttp.ClientSession
    state_dir: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    async def publish_flows(self, node: str, records: list[Flow], lost: int = 0) -> None:
        """Send as the datapath does: a BatchPublisher envelope of flow wire dicts with the
        per-batch label table."""
        pub = BatchPublisher(self.bus, flows(node), source="datapath", encode=pack_envelope)
        for f in records:
            pub.add(f.to_wire())
        if lost:
            pub.lost(lost)
        await pub.flush()
        await self.bus.nc.flush()

    async def publish_events(self, node: str, events: list[dict[str, Any]]) -> None:
        pub = BatchPublisher(self.bus, process(node), source="security")
        for e in events:
            pub.add(e)
        await pub.flush()
        await self.bus.nc.flush()

    async def status(self) -> dict[str, Any]:
        async with self.session.get(self.base + "/v1/observer/status", headers=self.auth) as r:
            if r.status != 200:
                raise RuntimeError(f"observer status: HTTP {r.status}")
            body: dict[str, Any] = await r.json()
            return body

    async def wait_seen(self, count: int, stream: str = "flows", timeout: float = 10) -> None:
        """Wait (with a deadline) until the service has ingested ``count`` records."""
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status()
            if st[stream]["received"] >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {st[stream]['received']} of {count} seen")
            await asyncio.sleep(0.01)

    async def wait_followers(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            followers = (await self.status())["flows"]["followers"]
            if followers >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{followers} of {count} followers connected")
            await asyncio.sleep(0.01)

    async def get(self, path: str, params: Any = None) -> tuple[int, Any]:
        async with self.session.get(self.base + path, params=params, headers=self.auth) as r:
            return r.status, await r.json(content_type=None)


Starter = Callable[..., Awaitable[EventsService]]


async def start_service(nats_url: str, bus: Bus, tmp_path: Path,
                        stops: list[tuple[asyncio.Event, asyncio.Task[None]]],
                        sessions: list[aiohttp.ClientSession]) -> EventsService:
    """Start one events service (environment already set); it is stopped through ``stops``."""
    port = free_port()
    settings = Settings(nats_url=nats_url, token=TOKEN, node="n1", state_dir=tmp_path,
                        http_port=port, replica=f"e{len(stops)}")
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(SPEC, settings, stop))
    stops.append((stop, task))
    base = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession()
    sessions.append(session)
    deadline = time.monotonic() + 20
    while True:
        try:
            async with session.get(base + "/readyz") as resp:
                if resp.status == 200:
                    break
        except aiohttp.ClientConnectionError:
            pass
        if task.done():
            raise RuntimeError("events service exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("events service never became ready")
        await asyncio.sleep(0.02)
    state = tmp_path / "client-state"
    ClientContext(state_dir=str(state), nats_url=nats_url, token=TOKEN,
                  services={"events": [base]}).save()
    return EventsService(base, bus, session, state)


async def stop_all(stops: list[tuple[asyncio.Event, asyncio.Task[None]]],
                   sessions: list[aiohttp.ClientSession]) -> None:
    for session in sessions:
        await session.close()
    for stop, task in stops:
        stop.set()
        await asyncio.wait_for(task, 20)
