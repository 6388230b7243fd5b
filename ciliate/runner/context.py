"""What a service's ``setup`` receives, and how a service describes itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ciliate.bus import Bus
from ciliate.config import Settings
from ciliate.store import Database

Setup = Callable[["ServiceContext"], Awaitable[None]]
ShutdownCallback = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    setup: Setup
    uses_db: bool = False
    per_node: bool = False
    """Datapath and security run once per node; the others may run as many replicas."""
    needs_root: bool = False


@dataclass
class ServiceContext:
    spec: ServiceSpec
    settings: Settings
    bus: Bus
    app: web.Application
    db: Database | None
    log: logging.Logger
    replica: str
    status: dict[str, Any] = field(default_factory=dict)
    """Free-form details shown by ``ciliate status --verbose`` (heartbeat payload)."""
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _shutdown: list[ShutdownCallback] = field(default_factory=list)

    @property
    def database(self) -> Database:
        if self.db is None:
            raise RuntimeError(f"{self.spec.name} was declared without a database")
        return self.db

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Run a background task for the life of the service; a crash is logged loudly."""
        task = asyncio.create_task(coro, name=name or None)

        def done(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and t.exception() is not None:
                self.log.error("task %s failed", t.get_name(), exc_info=t.exception())
                self.status.setdefault("errors", []).append(
                    f"task {t.get_name()} failed: {t.exception()!r}"
                )

        task.add_done_callback(done)
        self._tasks.append(task)
        return task

    def on_shutdown(self, callback: ShutdownCallback) -> None:
        self._shutdown.append(callback)
