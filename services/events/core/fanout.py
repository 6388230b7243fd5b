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
    """One subscriber: a filter, a bounded queue, its drop count, a wake-up event."""

    __slots__ = ("_event", "_queue", "closed", "dropped_total", "id", "maxlen", "pending_drops",
                 "query")

    def __init__(self, follower_id: int, query: FlowQuery, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("follower queue length must be positive")
        self.id = follower_id
        self.query = query
        self.maxlen = maxlen
        self._queue: deque[Wire] = deque()
        self.pending_drops = 0
        self.dropped_total = 0
        self.closed = False
        self._event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, w: Wire) -> bool:
        """Queue ``w`` if it passes the filter and there is room; count a drop otherwise."""
        if not self.query.accepts(w):
            return False
        if len(self._queue) >= self.maxlen:
            self.pending_drops += 1
            self.dropped_total += 1
            self._event.set()
            return False
        self._queue.append(w)
        self._event.set()
        return True

    def offer_many(self, batch: list[Wire]) -> int:
        """Queue the records of ``batch`` that pass the filter, as far as there is room."""
        q = self.query
        if q.since_ns is None and q.until_ns is None:
            match = q.filters.match
            accepted = [w for w in batch if match(w)]
        else:
            accepted = [w for w in batch if q.accepts(w)]
        if not accepted:
            return 0
        room = self.maxlen - len(self._queue)
        if len(accepted) > room:
            dropped = len(accepted) - max(room, 0)
            self.pending_drops += dropped
            self.dropped_total += dropped
            accepted = accepted[: max(room, 0)]
        self._queue.extend(accepted)
        self._event.set()
        return len(accepted)

    def drain(self, limit: int | None = None) -> list[Wire]:
        """Take queued records; a LostEvent follows them when records were dropped meanwhile."""
        q = self._queue
        n = len(q) if limit is None else min(limit, len(q))
        out = [q.popleft() for _ in range(n)]
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
        followers = tuple(self._followers.values())
        if not followers:
            return
        batch = records if isinstance(records, list) else list(records)
        for f in followers:
            f.offer_many(batch)

    def followers(self) -> list[Follower]:
        return list(self._followers.values())
