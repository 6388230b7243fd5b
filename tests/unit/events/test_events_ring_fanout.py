"""Rings overwrite the oldest and account for loss; the cluster view merges nodes by time;
fan-out keeps a slow follower from holding back the others."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.flows import Flow, LostEvent, Verdict, is_lost
from ciliate.flows.tables import LostEventSource
from services.events.core.fanout import Hub
from services.events.core.filters import FilterSet, FlowFilter
from services.events.core.query import FlowQuery, merge_by_time, select
from services.events.core.ring import DEFAULT_CAPACITY, Ring, valid_capacity


def _w(t: int, node: str = "n1", verdict: Verdict = Verdict.FORWARDED) -> dict[str, object]:
    return Flow(time_ns=t, node_name=node, verdict=verdict).to_wire()


def test_default_capacity_is_hubbles() -> None:
    assert DEFAULT_CAPACITY == 4095
    assert Ring().capacity == 4095
    assert valid_capacity(7) and not valid_capacity(8)
    with pytest.raises(ValueError):
        Ring(1000)


def test_ring_overwrites_oldest_and_reports_loss_to_a_slow_reader() -> None:
    ring = Ring(7, node="n1")
    ring.extend(_w(t) for t in range(10))
    assert len(ring) == 7
    assert [w["t"] for w in ring] == list(range(3, 10))
    assert ring.overwritten == 3
    result = ring.read_from(0)
    assert result.lost == 3
    assert [w["t"] for w in result.records] == list(range(3, 10))
    assert result.next_seq == 10
    lost = LostEvent.from_wire(ring.lost_event(result.lost))
    assert (lost.source, lost.num_events_lost) == (LostEventSource.HUBBLE_RING_BUFFER, 3)
    assert ring.read_from(10).records == []


@given(st.integers(1, 6).map(lambda n: 2**n - 1), st.integers(0, 200))
def test_ring_keeps_the_newest_capacity_records(capacity: int, count: int) -> None:
    ring = Ring(capacity)
    for t in range(count):
        ring.append(_w(t))
    kept = [w["t"] for w in ring]
    assert kept == list(range(max(0, count - capacity), count))
    assert ring.read_from(0).lost + len(kept) == count


def test_cluster_view_merges_nodes_by_time_and_takes_last_or_first() -> None:
    a, b = Ring(15, "n1"), Ring(15, "n2")
    a.extend(_w(t, "n1") for t in (1, 4, 5, 9))
    b.extend(_w(t, "n2") for t in (2, 3, 7, 8))
    assert [w["t"] for w in merge_by_time([a, b])] == [1, 2, 3, 4, 5, 7, 8, 9]
    assert [w["t"] for w in select([a, b], FlowQuery(number=3))] == [7, 8, 9]
    assert [w["t"] for w in select([a, b], FlowQuery(number=3, first=True))] == [1, 2, 3]
    assert [w["t"] for w in select([a, b], FlowQuery(since_ns=3, until_ns=7))] == [3, 4, 5, 7]
    assert [w["n"] for w in select([a, b], FlowQuery(nodes=["n2"]))] == ["n2"] * 4


def test_select_applies_filters_before_counting() -> None:
    ring = Ring(15)
    ring.extend(_w(t, verdict=Verdict.DROPPED if t % 2 else Verdict.FORWARDED)
                for t in range(10))
    q = FlowQuery(FilterSet([FlowFilter(verdict=["DROPPED"])]), number=2)
    assert [w["t"] for w in select([ring], q)] == [7, 9]


async def test_slow_follower_loses_counted_records_without_slowing_others() -> None:
    hub = Hub()
    slow = hub.add(maxlen=5)
    fast = hub.add(maxlen=1000)
    dropped_only = hub.add(FlowQuery(FilterSet([FlowFilter(verdict=["DROPPED"])])), maxlen=1000)
    received: list[int] = []

    async def consume() -> None:
        while len(received) < 100:
            received.extend(w["t"] for w in await fast.get())

    consumer = asyncio.create_task(consume())
    for t in range(100):
        hub.publish([_w(t, verdict=Verdict.DROPPED if t % 10 == 0 else Verdict.FORWARDED)])
        if t % 10 == 0:
            await asyncio.sleep(0)  # let the fast follower run, as the event loop would
    await asyncio.wait_for(consumer, timeout=5)
    assert received == list(range(100))

    batch = slow.drain()
    assert [w["t"] for w in batch[:-1]] == [0, 1, 2, 3, 4]
    assert is_lost(batch[-1])
    lost = LostEvent.from_wire(batch[-1])
    assert (lost.source, lost.num_events_lost) == (LostEventSource.OBSERVER_EVENTS_QUEUE, 95)
    assert slow.dropped_total == 95
    assert [w["t"] for w in dropped_only.drain()] == list(range(0, 100, 10))


async def test_follower_wakes_on_publish_and_on_close() -> None:
    hub = Hub()
    f = hub.add()
    waiter = asyncio.create_task(f.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish([_w(1)])
    assert [w["t"] for w in await asyncio.wait_for(waiter, timeout=5)] == [1]
    waiter = asyncio.create_task(f.get())
    await asyncio.sleep(0)
    hub.remove(f)
    assert await asyncio.wait_for(waiter, timeout=5) == []
    assert len(hub) == 0
