"""Fixtures: a real events service (in-process, via run_service) on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ciliate.bus import Bus
from services.events.testing import EventsService, Starter, start_service, stop_all


@pytest.fixture
async def start_events(nats_url: str, bus: Bus, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Starter]:
    """Start the events service with extra ``CILIATE_*`` environment; stopped after the test."""
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(**env: str) -> EventsService:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return await start_service(nats_url, bus, tmp_path, stops, sessions)

    try:
        yield start
    finally:
        await stop_all(stops, sessions)


@pytest.fixture
async def events(start_events: Starter) -> EventsService:
    return await start_events()
