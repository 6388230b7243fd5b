"""Helpers for tests and benchmarks: run a service in this event loop, wait on a condition.

They live in the shared kernel so every service's tests start services the same way; nothing
here imports a service (the spec is passed in).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from ciliate.config import Settings
from ciliate.runner import ServiceSpec, run_service
from ciliate.stack.ports import free_port


async def wait_until(
    check: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy, and return that.

    Fails with ``what`` and the last value at the deadline: a condition with a deadline, never
    a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def serving(
    spec: ServiceSpec, settings: Settings, *, ready_timeout: float = 20.0
) -> AsyncIterator[str]:
    """Run ``spec`` in this loop; yields its base URL once ``/readyz`` says ready, stops after.

    ``settings.http_port`` 0 picks a free port.
    """
    if not settings.http_port:
        settings = settings.with_overrides(http_port=free_port())
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(spec, settings, stop), name=f"service:{spec.name}")
    base = f"http://{settings.http_host}:{settings.http_port}"

    async def ready() -> bool:
        if task.done():
            task.result()  # raises what the service died of
            raise RuntimeError(f"{spec.name} exited during start-up")
        try:
            async with aiohttp.ClientSession() as session, session.get(base + "/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    try:
        await wait_until(ready, ready_timeout, f"{spec.name} to become ready")
        yield base
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
