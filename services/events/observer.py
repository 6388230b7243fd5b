"""The observer: per-node rings, the live hub, and ingest of batches as they come off NATS.

One ``Stream`` holds one kind of record (flows or process events). Ingest decodes a batch
with one C-level msgpack call, appends it to the node's ring and hands the same list to the
hub (followers filter on the raw dicts; nothing is turned into a ``Flow`` here). Batches are
accepted in both shapes on the bus:

* the ``BatchPublisher`` envelope ``{"source": str, "items": [record, ...], "lost": n}``, where
  ``lost`` > 0 becomes a LostEvent (PERF_EVENT_RING_BUFFER) in the stream; the datapath's adds
  a per-batch label table ``lt`` (``ciliate.flows.pack_envelope``), resolved here once per
  batch;
* a bare msgpack array of records (``ciliate.flows.encode_batch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack

from ciliate.flows.codec import TABLE, resolve_tables
from ciliate.flows.model import LostEvent, Wire
from ciliate.flows.tables import LostEventSource
from services.events.core.fanout import Follower, Hub
from services.events.core.query import FlowQuery, select
from services.events.core.ring import Ring

BatchHook = Callable[[list[Wire]], None]


class BadBatch(ValueError):
    """A message on ``flows.*``/``process.*`` that is not a batch of records."""


def decode(data: bytes, *, use_list: bool = True) -> tuple[list[Wire], int]:
    """(records, upstream lost count) from either batch shape.

    ``use_list=False`` decodes arrays inside records as tuples: flows are read-only once
    received. The cyclic garbage collector stops tracking tuples of strings at the first
    collection they survive, and the dicts holding only such values at the next full one;
    lists are tracked forever, so with lists every collection walks every held flow again
    (measured: more than the decoding itself).
    """
    try:
        obj: Any = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=use_list)
    except Exception as exc:  # msgpack raises assorted types on hostile input
        raise BadBatch(f"invalid msgpack: {type(exc).__name__}") from None
    lost = 0
    table = None
    if isinstance(obj, dict):
        if "items" in obj:
            lost = obj.get("lost") or 0
            table = obj.get(TABLE)
            obj = obj["items"]
        else:
            obj = [obj]
    if isinstance(obj, tuple):
        obj = list(obj)
    if not isinstance(obj, list) or not isinstance(lost, int):
        raise BadBatch("expected an array of records or {items: [...], lost: n}")
    if obj and set(map(type, obj)) != _DICT_ONLY:
        raise BadBatch("every record must be a map")
    if table is not None:
        try:
            resolve_tables(obj, table)
        except ValueError as exc:
            raise BadBatch(str(exc)) from None
    return obj, lost


_DICT_ONLY = {dict}


class RawBatch:
    """A batch kept in the ring as the bytes it arrived as; decoded again when history is read."""

    __slots__ = ("count", "data", "node", "stream")

    def __init__(self, stream: Stream, node: str, data: bytes, count: int) -> None:
        self.stream = stream
        self.node = node
        self.data = data
        self.count = count

    def __len__(self) -> int:
        return self.count

    def records(self) -> list[Wire]:
        records, _ = decode(self.data, use_list=self.stream.use_list)
        if self.stream.prepare is not None:
            self.stream.prepare(records, self.node)
        return records


class Stream:
    """Rings per node plus the live hub for one record kind.

    ``keep_raw``: rings hold each batch as its bus bytes (``RawBatch``) instead of the decoded
    records, which live only as long as fan-out and metrics need them (the flow stream; the
    process stream mutates its records on the way in and is small, so it keeps them).
    """

    def __init__(self, kind: str, ring_size: int, follower_queue: int,
                 prepare: Callable[[list[Wire], str], None] | None = None,
                 *, use_list: bool = True, keep_raw: bool = False) -> None:
        self.kind = kind
        self.use_list = use_list
        self.keep_raw = keep_raw
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
            records, lost = decode(data, use_list=self.use_list)
        except BadBatch:
            self.bad_batches_total += 1
            return 0
        raw = RawBatch(self, node, data, len(records)) if self.keep_raw and records else None
        return self.ingest(node, records, lost, raw)

    def ingest(self, node: str, records: list[Wire], lost: int = 0,
               raw: RawBatch | None = None) -> int:
        """Ring, fan-out and hooks for one decoded batch (``raw``: its bytes, for the ring)."""
        if self.prepare is not None:
            self.prepare(records, node)
        ring = self.ring(node)
        if raw is not None:
            ring.add_chunk(raw)
        if lost:
            self.upstream_lost_total += lost
            lost_record = LostEvent(source=LostEventSource.PERF_EVENT_RING_BUFFER,
                                    num_events_lost=lost, time_ns=time.time_ns(),
                                    node_name=node).to_wire()
            if raw is not None:
                ring.add_chunk([lost_record])
            records = [*records, lost_record]
        if not records:
            return 0
        if raw is None:
            ring.extend(records)
        self.batches_total += 1
        self.received_total += len(records)
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
