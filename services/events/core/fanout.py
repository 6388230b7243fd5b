"""Fan-out of the live stream to followers, each with its own filters and a bounded queue.

Publishing never waits on a follower: when a follower's queue is full the record is dropped
for that follower only and counted; the follower is handed a LostEvent
(OBSERVER_EVENTS_QUEUE) with the count right after the records it did receive. A slow follower
therefore costs the others nothing but the filter check.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable

from ciliate.flows.model import LostEvent, Wire
from ciliate.flows.tables import LostEventSource
from services.events.core.filters import FilterSet
from services.events.core.query import FlowQuery

DEFAULT_QUEUE = 4096


class Follower:
    """One subscriber: a filter, a bounded queue of batches, its drop count, a wake-up event.

    The queue holds the selected part of each published batch as one chunk (a list), so
    delivery costs one append per batch, not per record; ``maxlen`` bounds the records held.
    """

    __slots__ = ("_event", "_queue", "_queued", "closed", "dropped_total", "id", "maxlen",
                 "pending_drops", "query", "select", "select_key")

    def __init__(self, follower_id: int, query: FlowQuery, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("follower queue length must be positive")
        self.id = follower_id
        self.query = query
        self.maxlen = maxlen
        self._queue: deque[list[Wire]] = deque()
        self._queued = 0
        self.pending_drops = 0
        self.dropped_total = 0
        self.closed = False
        self._event = asyncio.Event()
        if query.since_ns is None and query.until_ns is None:
            self.select = query.filters.select
            self.select_key: object = query.filters.key
        else:
            accepts = query.accepts
            self.select = lambda batch: [w for w in batch if accepts(w)]
            self.select_key = ("window", follower_id)

    def __len__(self) -> int:
        return self._queued

    def offer(self, w: Wire) -> bool:
        """Queue ``w`` if it passes the filter and there is room; count a drop otherwise."""
        if not self.query.accepts(w):
            return False
        return self.put([w]) == 1

    def offer_many(self, batch: list[Wire]) -> int:
        """Queue the records of ``batch`` that pass the filter, as far as there is room."""
        return self.put(self.select(batch))

    def put(self, accepted: list[Wire]) -> int:
        """Queue already-selected records (kept as one chunk); what does not fit is counted."""
        n = len(accepted)
        if not n:
            return 0
        room = self.maxlen - self._queued
        if n > room:
            dropped = n - max(room, 0)
            self.pending_drops += dropped
            self.dropped_total += dropped
            self._event.set()
            if room <= 0:
                return 0
            accepted = accepted[:room]
            n = room
        self._queue.append(accepted)
        self._queued += n
        self._event.set()
        return n

    def drain(self, limit: int | None = None) -> list[Wire]:
        """Take queued records; a LostEvent follows them when records were dropped meanwhile."""
        q = self._queue
        out: list[Wire] = []
        want = self._queued if limit is None else min(limit, self._queued)
        while want:
            chunk = q.popleft()
            if len(chunk) > want:
                q.appendleft(chunk[want:])
                chunk = chunk[:want]
            out.extend(chunk)
            want -= len(chunk)
        self._queued -= len(out)
        if not q:
            if self.pending_drops:
                out.append(LostEvent(source=LostEventSource.OBSERVER_EVENTS_QUEUE,
                                     num_events_lost=self.pending_drops).to_wire())
                self.pending_drops = 0
            self._event.clear()
        return out

    async def get(self, limit: int | None = None) -> list[Wire]:
        """Wait until there is something to read (or the follower is closed), then drain."""
        while not self._queue and not self.pending_drops and not self.closed:
            await self._event.wait()
            if not self._queue and not self.pending_drops:
                self._event.clear()
        return self.drain(limit)

    def close(self) -> None:
        self.closed = True
        self._event.set()


class Hub:
    """The set of live followers; ``publish`` offers each record to every follower."""

    def __init__(self, default_queue: int = DEFAULT_QUEUE) -> None:
        self.default_queue = default_queue
        self._followers: dict[int, Follower] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._followers)

    def add(self, query: FlowQuery | None = None, maxlen: int | None = None) -> Follower:
        f = Follower(next(self._ids), query or FlowQuery(FilterSet()),
                     maxlen or self.default_queue)
        self._followers[f.id] = f
        return f

    def remove(self, follower: Follower) -> None:
        follower.close()
        self._followers.pop(follower.id, None)

    def publish(self, records: Iterable[Wire]) -> None:
        """Offer a batch to every follower; followers sharing a filter set select it once."""
        if not self._followers:
            return
        batch = records if isinstance(records, list) else list(records)
        selected: dict[object, list[Wire]] = {}
        for f in tuple(self._followers.values()):
            chosen = selected.get(f.select_key)
            if chosen is None:
                chosen = selected[f.select_key] = f.select(batch)
            f.put(chosen)

    def followers(self) -> list[Follower]:
        return list(self._followers.values())
