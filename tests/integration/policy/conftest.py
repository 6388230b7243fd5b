"""Fixtures for the policy integration tests (helpers live in ``policy_harness``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from policy_harness import TOKEN, FakeIdentity, PolicyStack, StackFactory, wait_for

from ciliate.bus import Bus
from ciliate.config import Settings
from ciliate.runner import run_service
from ciliate.stack.nats import NatsServer
from ciliate.stack.ports import free_port
from ciliate.store.database import sqlite_url
from ciliate.store.migrate import upgrade_async
from services.policy.service import SPEC


@pytest.fixture
async def policy_stack(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """``await policy_stack(capacity=None, allocate=True)`` starts everything; torn down after."""
    nats = NatsServer(tmp_path)
    nats.start()
    db_url = sqlite_url(tmp_path / "ciliate.db")
    await upgrade_async(db_url)
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    closers: list[Callable[[], Awaitable[None]]] = []

    async def start(capacity: int | None = None, allocate: bool = True) -> PolicyStack:
        port = free_port()
        extra = {"policy_map_capacity": str(capacity)} if capacity else {}
        settings = Settings(nats_url=nats.url, db_url=db_url, token=TOKEN, node="n1",
                            state_dir=tmp_path, http_port=port, extra=extra)
        stop = asyncio.Event()
        stops.append(stop)
        tasks.append(asyncio.create_task(run_service(SPEC, settings, stop)))
        bus = await Bus.connect(nats.url, name="test")
        closers.append(bus.close)
        session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
        closers.append(session.close)
        stack = PolicyStack(bus, f"http://127.0.0.1:{port}", session, FakeIdentity(bus),
                            nats.url)
        if allocate:
            await stack.serve_allocate()

        async def up() -> bool:
            try:
                status, _ = await stack.rest("GET", "/healthz")
            except aiohttp.ClientError:
                return False
            return status == 200

        await wait_for(up, what="the policy service to serve HTTP")
        return stack

    try:
        yield start
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for close in reversed(closers):
            await close()
        nats.stop()
