"""A small REST client for the services, using the context's token; tries replicas in order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

from ciliate.bus import Bus
from ciliate.client.context import ClientContext

Query = Mapping[str, str] | Sequence[tuple[str, str]]
"""Query parameters; a sequence of pairs repeats a parameter (``?pod=a&pod=b``)."""


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any, service: str, path: str) -> None:
        self.status = status
        self.body = body
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"{service} {path}: {status} {detail}")


class Client:
    def __init__(self, context: ClientContext, *, timeout: float = 30.0) -> None:
        self.context = context
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {context.token}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    @classmethod
    def from_context(cls) -> Client:
        return cls(ClientContext.load())

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        service: str,
        path: str,
        *,
        json: Any = None,
        params: Query | None = None,
    ) -> Any:
        """Send to the first replica of ``service`` that answers; error statuses raise."""
        urls = self.context.urls(service)
        if not urls:
            raise ApiError(503, {"detail": f"no {service} service in the context"}, service, path)
        last: Exception | None = None
        for base in urls:
            try:
                async with self._session.request(method, base + path, json=json,
                                                 params=params) as resp:
                    try:
                        body: Any = await resp.json(content_type=None)
                    except ValueError:
                        body = await resp.text()
                    if resp.status >= 400:
                        raise ApiError(resp.status, body, service, path)
                    return body
            except aiohttp.ClientConnectionError as exc:
                last = exc
                continue
        raise ApiError(503, {"detail": f"no {service} replica answered: {last}"}, service, path)

    async def get(self, service: str, path: str, params: Query | None = None) -> Any:
        return await self.request("GET", service, path, params=params)

    async def post(self, service: str, path: str, body: Any,
                   params: Query | None = None) -> Any:
        return await self.request("POST", service, path, json=body, params=params)

    async def delete(self, service: str, path: str) -> Any:
        return await self.request("DELETE", service, path)


async def connect_bus(context: ClientContext | None = None, *, name: str = "ciliate-cli") -> Bus:
    ctx = context or ClientContext.load()
    return await Bus.connect(ctx.nats_url, name=name, user=ctx.nats_user,
                             password=ctx.nats_password, retry_on_failed_connect=False)
