"""Per-node ring buffer of wire records, as Hubble's observer ring, held as per-batch chunks.

Capacity is ``2^n - 1`` (default 4095, Hubble's). Writing never blocks: the oldest records are
overwritten. Every record has a sequence number; a reader resuming from a sequence that has
been overwritten is told how many records it missed (a LostEvent), never silently skipped.

Ingest appends whole NATS batches, so the ring keeps the batches themselves as chunks
(``extend`` is O(1) per batch, not a per-record write) and trims whole chunks off the old end;
the oldest chunk may be partly overwritten (``_skip`` records of it are no longer held).
A chunk is a list of records or a ``LazyChunk``: the batch as it came off the bus, decoded
again only when someone reads history. Holding 4095 decoded flows costs ingest about a fifth
of its speed (memory and cache traffic); holding the bytes costs nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from ciliate.flows.model import LostEvent, Wire
from ciliate.flows.tables import LostEventSource

DEFAULT_CAPACITY = 4095


def valid_capacity(capacity: int) -> bool:
    """Hubble accepts capacities of the form 2^n - 1 (1, 3, 7, ..., 4095, ...)."""
    return capacity >= 1 and (capacity + 1) & capacity == 0


@dataclass(frozen=True, slots=True)
class ReadResult:
    records: list[Wire]
    next_seq: int
    lost: int


class LazyChunk(Protocol):
    """A batch held undecoded: its record count, and its records on demand."""

    def __len__(self) -> int: ...

    def records(self) -> list[Wire]: ...


Chunk = list[Wire] | LazyChunk


class Ring:
    """A fixed-size ring; ``written`` counts every record ever appended (the next sequence).

    Chunks handed to ``extend`` as lists are kept as they are: the caller must not change
    them afterwards (ingest never does; records are read-only once received).
    """

    __slots__ = ("_cap", "_chunks", "_held", "_skip", "node", "written")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, node: str = "") -> None:
        if not valid_capacity(capacity):
            raise ValueError(f"ring capacity must be 2^n-1 (for example 4095), got {capacity}")
        self._cap = capacity
        self._chunks: deque[Chunk] = deque()
        self._held = 0
        """Records in the chunks, including the ``_skip`` overwritten ones of the first."""
        self._skip = 0
        self.written = 0
        self.node = node

    @property
    def capacity(self) -> int:
        return self._cap

    def __len__(self) -> int:
        return self._held - self._skip

    @property
    def oldest_seq(self) -> int:
        return self.written - (self._held - self._skip)

    @property
    def overwritten(self) -> int:
        """How many records have been pushed out of the ring so far."""
        return self.oldest_seq

    def append(self, w: Wire) -> int:
        seq = self.written
        self.extend([w])
        return seq

    def extend(self, records: Iterable[Wire]) -> None:
        chunk = records if isinstance(records, list) else list(records)
        if len(chunk) > self._cap:
            self.written += len(chunk) - self._cap
            chunk = chunk[len(chunk) - self._cap:]
        self.add_chunk(chunk)

    def add_chunk(self, chunk: Chunk) -> None:
        """Append a whole batch (a list, or a lazily decoded one) without copying it."""
        n = len(chunk)
        if not n:
            return
        self._chunks.append(chunk)
        self._held += n
        self.written += n
        self._trim()

    def _trim(self) -> None:
        excess = self._held - self._skip - self._cap
        if excess <= 0:
            return
        chunks = self._chunks
        skip = self._skip + excess
        while skip >= len(chunks[0]):
            first = chunks.popleft()
            skip -= len(first)
            self._held -= len(first)
        self._skip = skip

    def _from(self, offset: int) -> Iterator[Wire]:
        """Held records from ``offset`` (0 = the oldest held) on, oldest to newest."""
        offset += self._skip
        for held in self._chunks:
            size = len(held)
            if offset >= size:
                offset -= size
                continue
            chunk = held if isinstance(held, list) else held.records()
            if offset:
                yield from islice(chunk, offset, None)
                offset = 0
            else:
                yield from chunk

    def __iter__(self) -> Iterator[Wire]:
        """Oldest to newest."""
        return self._from(0)

    def last(self, n: int) -> list[Wire]:
        held = len(self)
        return list(self._from(max(0, held - n))) if n > 0 else []

    def read_from(self, seq: int, limit: int | None = None) -> ReadResult:
        """Records from ``seq`` on; ``lost`` counts those overwritten before they were read."""
        lost = 0
        oldest = self.oldest_seq
        if seq < oldest:
            lost = oldest - seq
            seq = oldest
        end = self.written if limit is None else min(self.written, seq + limit)
        out = list(islice(self._from(seq - oldest), max(0, end - seq))) if seq < end else []
        return ReadResult(out, end, lost)

    def lost_event(self, lost: int, time_ns: int = 0) -> Wire:
        """The LostEvent record a reader that fell ``lost`` records behind is given."""
        return LostEvent(source=LostEventSource.HUBBLE_RING_BUFFER, num_events_lost=lost,
                         time_ns=time_ns, node_name=self.node).to_wire()
