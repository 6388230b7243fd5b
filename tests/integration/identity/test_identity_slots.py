"""Endpoint ids and pod addresses picked from a process's view of what is taken (AddressSlots):
distinct across replicas whose views are stale, no waiting on another transaction's
uncommitted slot, and node CIDRs cached only once committed."""

from __future__ import annotations

import asyncio

from ciliate.store import Database
from services.identity.repository import AddressRepository, AddressSlots

WAIT = 5.0
"""Longer than any of these statements takes; a wait on another transaction would exceed it."""


async def test_a_slot_held_by_an_open_transaction_is_skipped_without_waiting(
    pg_db: Database,
) -> None:
    slots_a, slots_b = AddressSlots(), AddressSlots()
    async with pg_db.unit_of_work() as setup:  # a node's first CIDR is assigned once, committed
        await AddressRepository(setup.session).node_cidr("n1")
        await setup.commit()
    async with pg_db.unit_of_work() as first:
        repo_a = AddressRepository(first.session, slots=slots_a)
        assert await repo_a.endpoint_id("ns/a") == 1
        assert await repo_a.allocate("ns/a", "n1") == "10.244.0.2"
        # Another replica, whose view knows nothing of the uncommitted rows above.
        async with pg_db.unit_of_work() as second:
            repo_b = AddressRepository(second.session, slots=slots_b)
            assert await asyncio.wait_for(repo_b.endpoint_id("ns/b"), WAIT) == 2
            await second.commit()
        async with pg_db.unit_of_work() as third:
            repo_b = AddressRepository(third.session, slots=slots_b)
            assert await asyncio.wait_for(repo_b.allocate("ns/b", "n1"), WAIT) == "10.244.0.3"
            await third.commit()
        await first.commit()


async def test_stale_views_of_two_replicas_still_hand_out_distinct_slots(
    any_db: Database,
) -> None:
    views = [AddressSlots(), AddressSlots()]
    got: list[tuple[int, str]] = []
    for index in range(20):
        async with any_db.unit_of_work() as uow:
            repo = AddressRepository(uow.session, slots=views[index % 2])
            owner = f"ns/p{index}"
            got.append((await repo.endpoint_id(owner), await repo.allocate(owner, "n1")))
            await uow.commit()
    assert sorted(i for i, _ in got) == list(range(1, 21))
    assert len({ip for _, ip in got}) == 20


async def test_concurrent_applies_on_two_replicas_get_distinct_slots(pg_db: Database) -> None:
    replicas = [Database(pg_db.url) for _ in range(2)]
    views = [AddressSlots(), AddressSlots()]

    async def one(index: int) -> tuple[int, str]:
        db, view = replicas[index % 2], views[index % 2]
        async with db.unit_of_work() as uow:
            repo = AddressRepository(uow.session, slots=view)
            owner = f"ns/c{index}"
            ip = await repo.allocate(owner, "n1")
            ident = await repo.endpoint_id(owner)
            await uow.commit()
        return ident, ip

    try:
        got = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), 60)
    finally:
        for db in replicas:
            await db.close()
    assert len({i for i, _ in got}) == 40
    assert len({ip for _, ip in got}) == 40


async def test_released_slots_are_reused_lowest_first(any_db: Database) -> None:
    view = AddressSlots()
    async with any_db.unit_of_work() as uow:
        repo = AddressRepository(uow.session, slots=view)
        for name in ("a", "b", "c"):
            await repo.endpoint_id(f"ns/{name}")
            await repo.allocate(f"ns/{name}", "n1")
        await repo.release_endpoint_id("ns/b")
        assert await repo.release("ns/b") == ["10.244.0.3"]
        assert await repo.endpoint_id("ns/d") == 2
        assert await repo.allocate("ns/d", "n1") == "10.244.0.3"
        await uow.commit()


async def test_a_node_cidr_assigned_in_a_rolled_back_transaction_is_not_cached(
    any_db: Database,
) -> None:
    view = AddressSlots()
    async with any_db.unit_of_work() as uow:
        assert await AddressRepository(uow.session, slots=view).node_cidr("n1") == "10.244.0.0/24"
        # no commit: the assignment is rolled back
    assert "n1" not in view.node_cidrs
    async with any_db.unit_of_work() as uow:
        repo = AddressRepository(uow.session, slots=view)
        assert await repo.node_cidr("other") == "10.244.0.0/24"
        assert await repo.node_cidr("n1") == "10.244.1.0/24"
        await uow.commit()
    async with any_db.unit_of_work() as uow:
        assert await AddressRepository(uow.session, slots=view).node_cidr("n1") == "10.244.1.0/24"
    assert view.node_cidrs == {"n1": "10.244.1.0/24"}


async def test_a_view_missing_a_long_run_of_slots_learns_them(any_db: Database) -> None:
    """One replica commits a group of 120 pods; the other's view knows none of them. Its next
    pod still gets a slot (more refusals than the attempts allow, so it must read what is taken
    rather than learn one refused insert at a time)."""
    busy, stale = AddressSlots(), AddressSlots()
    async with any_db.unit_of_work() as uow:
        repo = AddressRepository(uow.session, slots=stale)
        assert await repo.endpoint_id("ns/first") == 1  # the stale view is loaded, then lags
        assert await repo.allocate("ns/first", "n1") == "10.244.0.2"
        await uow.commit()
    async with any_db.unit_of_work() as uow:
        repo = AddressRepository(uow.session, slots=busy)
        for index in range(120):
            await repo.endpoint_id(f"ns/group{index}")
            await repo.allocate(f"ns/group{index}", "n1")
        await uow.commit()
    async with any_db.unit_of_work() as uow:
        repo = AddressRepository(uow.session, slots=stale)
        assert await repo.endpoint_id("ns/late") == 122
        assert await repo.allocate("ns/late", "n1") == "10.244.0.123"
        await uow.commit()
