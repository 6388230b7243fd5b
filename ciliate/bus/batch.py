"""Batched publishing for high-volume events, with counted (never silent) drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import nats.errors

from ciliate.bus import codec

if TYPE_CHECKING:
    from ciliate.bus.client import Bus

log = logging.getLogger("ciliate.bus.batch")


def _envelope(source: str, items: Sequence[Any], lost: int) -> bytes:
    return codec.pack({"source": source, "items": items, "lost": lost})


class BatchPublisher:
    """Collects items and publishes ``{"source": s, "items": [...], "lost": n}`` batches on one
    subject.

    ``add`` never blocks: past ``max_pending`` items the newest are dropped and counted, and the
    count rides on the next batch so the consumer can emit a LostEvent-style record.
    ``encode(source, items, lost)`` packs a batch when the subject has its own envelope (flows:
    ``ciliate.flows.pack_envelope``, with a per-batch label table); by default the envelope
    above, msgpack.
    """

    def __init__(
        self,
        bus: Bus,
        subject: str,
        *,
        max_batch: int = 512,
        max_delay: float = 0.02,
        max_pending: int = 65536,
        source: str = "",
        encode: Callable[[str, Sequence[Any], int], bytes] | None = None,
    ) -> None:
        self.bus = bus
        self.subject = subject
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_pending = max_pending
        self.source = source
        self.encode = encode or _envelope
        self._items: list[Any] = []
        self._lost_pending = 0
        self.lost_total = 0
        self.published_total = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, item: Any) -> None:
        if len(self._items) >= self.max_pending:
            self._lost_pending += 1
            self.lost_total += 1
            return
        self._items.append(item)
        if len(self._items) >= self.max_batch:
            self._wake.set()

    def lost(self, count: int) -> None:
        """Account for items lost before they reached us (for example a full ring buffer)."""
        self._lost_pending += count
        self.lost_total += count

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batch:{self.subject}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        while self._items or self._lost_pending:
            items, self._items = self._items[: self.max_batch], self._items[self.max_batch :]
            lost, self._lost_pending = self._lost_pending, 0
            try:
                await self.bus.publish_raw(self.subject, self.encode(self.source, items, lost))
                self.published_total += len(items)
            except (nats.errors.Error, OSError) as exc:
                log.warning("batch %s: publish failed (%s); %d items lost", self.subject, exc,
                            len(items))
                self._lost_pending += len(items) + lost
                self.lost_total += len(items)
                return

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.max_delay)
            self._wake.clear()
            await self.flush()
