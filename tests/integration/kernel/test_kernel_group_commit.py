"""Group commit of applies (``ResourceHandlers(group_commit=N)``) on SQLite and PostgreSQL:
concurrent applies share transactions, one refused apply takes none of the others with it,
nothing of it is stored, and ``after_commit`` publishes exactly what was committed."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from ciliate.api.problems import Problem
from ciliate.api.resources import GroupCommit, ResourceHandlers
from ciliate.resources.base import Resource
from ciliate.resources.registry import parse_resource
from ciliate.store import Database, ResourceRepository, StoredResource
from ciliate.store.database import UnitOfWork

collected: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "collected", default=None
)


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def pod(name: str, bad: bool = False) -> Resource:
    return parse_resource({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "x",
                     "labels": {"app": "a", **({"bad": "yes"} if bad else {})}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    })


async def test_one_refused_apply_leaves_the_rest_of_its_group_applied(any_db_url: str) -> None:
    db = Database(any_db_url)
    published: list[str] = []
    commits = 0

    async def on_apply(
        uow: UnitOfWork, resource: Resource, _old: StoredResource | None, _dry: bool
    ) -> dict[str, Any]:
        # A derived row written before the refusal: it must not survive the refusal.
        marker = {"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": f"marker-{resource.metadata.name}"}}
        await ResourceRepository(uow.session).apply(marker)
        if "bad" in resource.metadata.labels:
            raise Problem(409, "refused")
        names = collected.get()
        if names is None:
            names = []
            collected.set(names)
        names.append(resource.metadata.name)
        return {"seen": resource.metadata.name}

    async def after_commit() -> None:
        nonlocal commits
        commits += 1
        published.extend(collected.get() or [])
        collected.set(None)

    handlers = ResourceHandlers(db, frozenset({"Pod"}), on_apply=on_apply,
                                after_commit=after_commit, group_commit=16)
    group = GroupCommit(handlers, 16)
    names = [f"p{i}" for i in range(20)]
    try:
        outcomes = await asyncio.gather(
            *(group.submit(pod(n, bad=(n == "p7"))) for n in names), return_exceptions=True
        )
        good = [n for n in names if n != "p7"]
        for name, outcome in zip(names, outcomes, strict=True):
            if name == "p7":
                assert isinstance(outcome, Problem) and outcome.status_code == 409
                continue
            assert not isinstance(outcome, BaseException), outcome
            result, extra = outcome
            assert result.created and result.resource.name == name
            assert extra == {"seen": name}
        assert group.batches >= 1, "no applies shared a transaction"
        assert group.fallbacks == 1
        assert commits < len(good), "every apply had its own commit"
        assert sorted(published) == sorted(good)
        async with db.unit_of_work() as uow:
            repo = ResourceRepository(uow.session)
            stored = {p.name for p in await repo.list("Pod", "x")}
            markers = {n.name for n in await repo.list("Namespace")}
        assert stored == set(good)
        assert markers == {f"marker-{n}" for n in good}
    finally:
        await db.close()


async def test_concurrent_creates_of_one_object_all_succeed(any_db_url: str) -> None:
    """Six applies of the same new object, all past their "absent" read before any inserts
    (a barrier in the hook): one creates it, the others update it instead of failing with
    the unique constraint (409). KV-side state of a lost attempt is dropped."""
    db = Database(any_db_url)
    racers = 6
    arrived = 0
    all_read = asyncio.Event()
    published: list[str] = []

    async def on_apply(
        _uow: UnitOfWork, resource: Resource, old: StoredResource | None, _dry: bool
    ) -> dict[str, Any]:
        nonlocal arrived
        names = collected.get()
        if names is None:
            names = []
            collected.set(names)
        names.append("created" if old is None else "updated")
        if arrived < racers:
            arrived += 1
            if arrived == racers:
                all_read.set()
            await asyncio.wait_for(all_read.wait(), 10)
        return {}

    async def after_commit() -> None:
        published.extend(collected.get() or [])
        collected.set(None)

    def racer(index: int) -> Resource:  # each a change over the others: each publishes
        return parse_resource({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "same", "namespace": "x", "labels": {"racer": str(index)}},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
        })

    handlers = ResourceHandlers(db, frozenset({"Pod"}), on_apply=on_apply,
                                after_commit=after_commit)
    try:
        outcomes = await asyncio.gather(
            *(handlers.apply_alone(racer(i)) for i in range(racers)), return_exceptions=True
        )
        assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
        created = [o for o in outcomes if not isinstance(o, BaseException) and o[0].created]
        assert len(created) == 1
        # One publication per committed attempt: the creator's, and an update per loser whose
        # first attempt (a "created" that rolled back) is not among them.
        assert sorted(published) == ["created"] + ["updated"] * (racers - 1)
    finally:
        await db.close()
