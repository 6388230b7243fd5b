"""Per-node ring buffer of wire records, as Hubble's observer ring.

Capacity is ``2^n - 1`` (default 4095, Hubble's). Writing never blocks: the oldest record is
overwritten. Every record gets a sequence number; a reader resuming from a sequence that has
been overwritten is told how many records it missed (a LostEvent), never silently skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


class Ring:
    """A fixed-size ring; ``written`` counts every record ever appended (the next sequence)."""

    __slots__ = ("_buf", "_cap", "node", "written")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, node: str = "") -> None:
        if not valid_capacity(capacity):
            raise ValueError(f"ring capacity must be 2^n-1 (for example 4095), got {capacity}")
        self._cap = capacity
        self._buf: list[Wire | None] = [None] * capacity
        self.written = 0
        self.node = node

    @property
    def capacity(self) -> int:
        return self._cap

    def __len__(self) -> int:
        return min(self.written, self._cap)

    @property
    def oldest_seq(self) -> int:
        return max(0, self.written - self._cap)

    @property
    def overwritten(self) -> int:
        """How many records have been pushed out of the ring so far."""
        return self.oldest_seq

    def append(self, w: Wire) -> int:
        seq = self.written
        self._buf[seq % self._cap] = w
        self.written = seq + 1
        return seq

    def extend(self, records: Iterable[Wire]) -> None:
        buf, cap, seq = self._buf, self._cap, self.written
        for w in records:
            buf[seq % cap] = w
            seq += 1
        self.written = seq

    def __iter__(self) -> Iterator[Wire]:
        """Oldest to newest."""
        buf, cap = self._buf, self._cap
        for seq in range(self.oldest_seq, self.written):
            w = buf[seq % cap]
            assert w is not None
            yield w

    def last(self, n: int) -> list[Wire]:
        start = max(self.oldest_seq, self.written - n)
        return [w for w in (self._buf[s % self._cap] for s in range(start, self.written))
                if w is not None]

    def read_from(self, seq: int, limit: int | None = None) -> ReadResult:
        """Records from ``seq`` on; ``lost`` counts those overwritten before they were read."""
        lost = 0
        if seq < self.oldest_seq:
            lost = self.oldest_seq - seq
            seq = self.oldest_seq
        end = self.written if limit is None else min(self.written, seq + limit)
        out = [self._buf[s % self._cap] for s in range(seq, end)]
        return ReadResult([w for w in out if w is not None], end, lost)

    def lost_event(self, lost: int, time_ns: int = 0) -> Wire:
        """The LostEvent record a reader that fell ``lost`` records behind is given."""
        return LostEvent(source=LostEventSource.HUBBLE_RING_BUFFER, num_events_lost=lost,
                         time_ns=time_ns, node_name=self.node).to_wire()
