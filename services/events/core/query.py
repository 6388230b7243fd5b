"""Reading the rings: one node's or the whole cluster's, merged by time as hubble-relay does."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

from ciliate.flows.model import Wire
from services.events.core.filters import FilterSet
from services.events.core.ring import Ring


def _time(w: Wire) -> int:
    t: int = w.get("t", 0)
    return t


def merge_by_time(streams: Iterable[Iterable[Wire]]) -> Iterator[Wire]:
    """Merge per-node streams (each oldest → newest) into one cluster stream ordered by time."""
    return heapq.merge(*streams, key=_time)


@dataclass
class FlowQuery:
    """GetFlowsRequest: which records, how many, from where in time."""

    filters: FilterSet = field(default_factory=FilterSet)
    since_ns: int | None = None
    until_ns: int | None = None
    number: int | None = None
    first: bool = False
    nodes: Sequence[str] | None = None

    def in_window(self, w: Wire) -> bool:
        t = _time(w)
        if self.since_ns is not None and t < self.since_ns:
            return False
        return self.until_ns is None or t <= self.until_ns

    def accepts(self, w: Wire) -> bool:
        return self.in_window(w) and self.filters.match(w)


def select(rings: Iterable[Ring], query: FlowQuery) -> list[Wire]:
    """The records a non-follow GetFlows returns: filtered, merged by time, first/last N."""
    chosen = [r for r in rings if query.nodes is None or r.node in query.nodes]
    streams = [(w for w in ring if query.accepts(w)) for ring in chosen]
    merged = merge_by_time(streams)
    if query.number is None:
        return list(merged)
    if query.first:
        return list(islice(merged, query.number))
    tail: list[Wire] = []
    for w in merged:
        tail.append(w)
        if len(tail) > 2 * query.number:
            del tail[: len(tail) - query.number]
    return tail[-query.number:] if query.number else []
