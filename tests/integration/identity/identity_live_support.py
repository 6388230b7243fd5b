"""The live identity service as the tests drive it: one replica and its REST session."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ciliate.config import Settings

TOKEN = "identity-test-token"
READY_DEADLINE = 20.0


@dataclass
class LiveIdentity:
    """One running replica of the identity service and an authenticated REST session."""

    url: str
    settings: Settings
    session: aiohttp.ClientSession
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body) as resp:
            return resp.status, await resp.json()

    async def get(self, path: str) -> Any:
        status, body = await self.call("GET", path)
        assert status == 200, (path, status, body)
        return body

    async def apply(self, doc: dict[str, Any]) -> tuple[int, Any]:
        return await self.call("POST", "/v1/resources", doc)

    async def apply_ok(self, doc: dict[str, Any]) -> Any:
        status, body = await self.apply(doc)
        assert status in (200, 201), (doc["metadata"], status, body)
        return body


StartIdentity = Callable[..., Awaitable[LiveIdentity]]
