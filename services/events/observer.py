"""The observer: per-node rings, the live hub, and ingest of batches as they come off NATS.

One ``Stream`` holds one kind of record (flows or process events). Ingest decodes a batch
with one C-level msgpack call, appends it to the node's ring and hands the same list to the
hub (followers filter on the raw dicts; nothing is turned into a ``Flow`` here). Batches are
accepted in both shapes on the bus:

* the ``BatchPublisher`` envelope ``{"source": str, "items": [record, ...], "lost": n}``, where
  ``lost`` > 0 becomes a LostEvent (PERF_EVENT_RING_BUFFER) in the stream;
* a bare msgpack array of records (``ciliate.flows.encode_batch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack

from ciliate.flows.model import LostEvent, Wire
from ciliate.flows.tables import LostEventSource
from services.events.core.fanout import Follower, Hub
from services.events.core.query import FlowQuery, select
from services.events.core.ring import Ring

BatchHook = Callable[[list[Wire]], None]


class BadBatch(ValueError):
    """A message on ``flows.*``/``process.*`` that is not a batch of records."""


def decode(data: bytes) -> tuple[list[Wire], int]:
    """(records, upstream lost count) from either batch shape."""
    try:
        obj: Any = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises assorted types on hostile input
        raise BadBatch(f"invalid msgpack: {type(exc).__name__}") from None
    lost = 0
    if isinstance(obj, dict):
        if "items" in obj:
            lost = obj.get("lost") or 0
            obj = obj["items"]
        else:
            obj = [obj]
    if not isinstance(obj, list) or not isinstance(lost, int):
        raise BadBatch("expected an array of records or {items: [...], lost: n}")
    for w in obj:
        if not isinstance(w, dict):
            raise BadBatch("every record must be a map")
    return obj, lost


class Stream:
    """Rings per node plus the live hub for one record kind."""

    def __init__(self, kind: str, ring_size: int, follower_queue: int,
                 prepare: Callable[[list[Wire], str], None] | None = None) -> None:
        self.kind = kind
        self.ring_size = ring_size
        self.rings: dict[str, Ring] = {}
        self.hub = Hub(follower_queue)
        self.hooks: list[BatchHook] = []
        self.prepare = prepare
        self.received_total = 0
        self.batches_total = 0
        self.bad_batches_total = 0
        self.upstream_lost_total = 0

    def ring(self, node: str) -> Ring:
        ring = self.rings.get(node)
        if ring is None:
            ring = self.rings[node] = Ring(self.ring_size, node)
        return ring

    def ingest_bytes(self, node: str, data: bytes) -> int:
        """Decode and ingest one bus message; a bad one is counted and skipped."""
        try:
            records, lost = decode(data)
        except BadBatch:
            self.bad_batches_total += 1
            return 0
        return self.ingest(node, records, lost)

    def ingest(self, node: str, records: list[Wire], lost: int = 0) -> int:
        if self.prepare is not None:
            self.prepare(records, node)
        if lost:
            self.upstream_lost_total += lost
            records = [*records, LostEvent(source=LostEventSource.PERF_EVENT_RING_BUFFER,
                                           num_events_lost=lost, time_ns=time.time_ns(),
                                           node_name=node).to_wire()]
        if not records:
            return 0
        self.batches_total += 1
        self.received_total += len(records)
        self.ring(node).extend(records)
        self.hub.publish(records)
        for hook in self.hooks:
            hook(records)
        return len(records)

    def query(self, query: FlowQuery) -> list[Wire]:
        """History for a request; a ring that overran inside the asked window says so first.

        When the caller wants the oldest records (``first`` N) or a ``since`` older than what a
        node's ring still holds, that ring's overwritten count leads the answer as a LostEvent
        (HUBBLE_RING_BUFFER) instead of being skipped in silence.
        """
        lost: list[Wire] = []
        now = time.time_ns()
        for node, ring in sorted(self.rings.items()):
            if query.nodes is not None and node not in query.nodes:
                continue
            if not ring.overwritten or not len(ring):
                continue
            oldest = next(iter(ring)).get("t", 0)
            wants_old = query.first or (query.since_ns is not None and query.since_ns < oldest)
            if wants_old:
                lost.append(ring.lost_event(ring.overwritten, now))
        return lost + select(self.rings.values(), query)

    def follow(self, query: FlowQuery, maxlen: int | None = None,
               history: bool = True) -> tuple[list[Wire], Follower]:
        """Register a follower and take its history in one step: no gap, no duplicate."""
        follower = self.hub.add(FlowQuery(query.filters, None, query.until_ns), maxlen)
        past: list[Wire] = []
        if history and (query.number is not None or query.since_ns is not None):
            past = self.query(query)
        return past, follower

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received_total,
            "batches": self.batches_total,
            "bad_batches": self.bad_batches_total,
            "upstream_lost": self.upstream_lost_total,
            "followers": len(self.hub),
            "nodes": {n: {"held": len(r), "written": r.written, "overwritten": r.overwritten}
                      for n, r in sorted(self.rings.items())},
        }


def fill_node(records: list[Wire], node: str) -> None:
    """Flows without a node name take the node of the subject they came on."""
    if records and "n" not in records[0]:
        for w in records:
            w.setdefault("n", node)
