"""The identity tables: one label set one id, across allocators; refcounts, GC, addresses."""

from __future__ import annotations

import asyncio
import random

import pytest
import sqlalchemy as sa

from ciliate.labels import LabelSet, endpoint_labels
from ciliate.store import Database
from services.identity.core.allocator import CIDR_IDENTITY_MIN
from services.identity.repository import (
    AddressRepository,
    IdentityAllocator,
    IpConflict,
    identities,
    run_in_transaction,
)


def labels(i: int) -> LabelSet:
    return endpoint_labels({"app": f"app{i}"}, "ns", {})


async def allocate(db: Database, alloc: IdentityAllocator, sets: list[LabelSet]) -> list[int]:
    return await run_in_transaction(db, lambda session: alloc.allocate(session, sets))


async def test_same_label_set_same_id_across_restarts(any_db: Database) -> None:
    first = await allocate(any_db, IdentityAllocator(), [labels(1), labels(2), labels(1)])
    assert first[0] == first[2] != first[1]
    assert all(256 <= i <= 65535 for i in first)
    restarted = IdentityAllocator()  # a new process: empty caches
    again = await allocate(any_db, restarted, [labels(2), labels(1)])
    assert again == [first[1], first[0]]
    async with any_db.unit_of_work() as uow:
        row = await restarted.get(uow.session, first[0])
    assert row is not None and row.refcount == 3
    assert row.labels == labels(1).sorted_strings()


async def test_reserved_and_cidr_scopes(any_db: Database) -> None:
    alloc = IdentityAllocator()
    world = LabelSet.from_strings(["reserved:world"])
    cidr = LabelSet.from_strings(["cidr:10.0.0.0/8"])
    ids = await allocate(any_db, alloc, [world, cidr, labels(3)])
    assert ids[0] == 2
    assert ids[1] >= CIDR_IDENTITY_MIN
    assert ids[2] < CIDR_IDENTITY_MIN


async def test_release_grace_and_gc(any_db: Database) -> None:
    alloc = IdentityAllocator(grace=60.0)
    async with any_db.unit_of_work() as uow:
        (ident,) = await alloc.allocate(uow.session, [labels(5)], now=0.0)
        assert await alloc.release(uow.session, [ident], now=10.0) == [ident]
        # Inside the grace period the id stays with its label set and is not collected.
        assert await alloc.collect_garbage(uow.session, now=50.0) == []
        assert await alloc.allocate(uow.session, [labels(5)], now=55.0) == [ident]
        assert await alloc.release(uow.session, [ident], now=60.0) == [ident]
        assert await alloc.collect_garbage(uow.session, now=130.0) == [ident]
        assert await alloc.lookup(uow.session, [labels(5).canonical()]) == {}
        await uow.commit()


async def test_release_counts_references(any_db: Database) -> None:
    alloc = IdentityAllocator()
    async with any_db.unit_of_work() as uow:
        ident, _ = await alloc.allocate(uow.session, [labels(6), labels(6)])
        assert await alloc.release(uow.session, [ident]) == []
        assert await alloc.release(uow.session, [ident, ident]) == [ident]
        row = await alloc.get(uow.session, ident)
        assert row is not None and row.refcount == 0 and row.released_at is not None


async def test_colliding_candidate_ids_are_retried(any_db: Database) -> None:
    """Two allocators with the same random sequence pick the same ids; none is lost."""
    one = IdentityAllocator(rng=random.Random(7))
    two = IdentityAllocator(rng=random.Random(7))
    a = await allocate(any_db, one, [labels(i) for i in range(20)])
    b = await allocate(any_db, two, [labels(i) for i in range(20, 40)])
    assert len(set(a) | set(b)) == 40


async def test_addresses_node_cidrs_and_endpoint_ids(any_db: Database) -> None:
    async with any_db.unit_of_work() as uow:
        repo = AddressRepository(uow.session)
        assert await repo.node_cidr("n1") == "10.244.0.0/24"
        assert await repo.node_cidr("n2") == "10.244.1.0/24"
        assert await repo.node_cidr("n1") == "10.244.0.0/24"
        first = await repo.allocate("x/a", "n2")
        second = await repo.allocate("x/b", "n2")
        assert (first, second) == ("10.244.1.2", "10.244.1.3")
        await repo.claim("10.244.1.10", "x/c", "n2")
        await repo.claim("10.244.1.10", "x/c", "n2")  # idempotent for its owner
        with pytest.raises(IpConflict) as err:
            await repo.claim("10.244.1.10", "y/d", "n2")
        assert err.value.holder == "x/c"
        assert await repo.release("x/a") == ["10.244.1.2"]
        assert await repo.allocate("x/e", "n2") == "10.244.1.2"
        assert await repo.endpoint_id("x/a") == 1
        assert await repo.endpoint_id("x/b") == 2
        assert await repo.endpoint_id("x/a") == 1
        await repo.release_endpoint_id("x/a")
        assert await repo.endpoint_id("x/z") == 1
        await uow.commit()


async def test_three_replicas_race_for_the_same_500_label_sets(pg_db: Database) -> None:
    """Three allocators, each with its own connection pool, allocate the same 500 label sets
    at once in shuffled batches: exactly 500 identities, one id per label set."""
    sets = [labels(i) for i in range(500)]
    replicas = [Database(pg_db.url) for _ in range(3)]

    async def replica(db: Database, seed: int) -> dict[str, int]:
        rnd = random.Random(seed)
        alloc = IdentityAllocator(rng=random.Random(seed))
        order = sets[:]
        rnd.shuffle(order)
        got: dict[str, int] = {}
        for start in range(0, 500, 50):
            batch = order[start : start + 50]
            ids = await allocate(db, alloc, batch)
            got.update({ls.canonical(): i for ls, i in zip(batch, ids, strict=True)})
        return got

    try:
        results = await asyncio.gather(*(replica(db, s) for s, db in enumerate(replicas)))
    finally:
        for db in replicas:
            await db.close()
    assert results[0] == results[1] == results[2]
    assert len(set(results[0].values())) == 500
    async with pg_db.unit_of_work() as uow:
        count = await uow.session.execute(sa.select(sa.func.count()).select_from(identities))
        assert count.scalar_one() == 500
        refs = await uow.session.execute(sa.select(sa.func.sum(identities.c.refcount)))
        assert refs.scalar_one() == 1500
