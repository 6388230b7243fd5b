"""Migrations and the resource repository on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from ciliate.store import Database, ResourceRepository
from ciliate.store.migrate import downgrade, upgrade

POD = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
       "spec": {"containers": [{"name": "c"}]}}


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


async def test_migrations_go_down_and_up_again(any_db_url: str) -> None:
    db = Database(any_db_url)
    try:
        assert "resources" in await _tables(db)
        await db.engine.dispose()
        await asyncio.to_thread(downgrade, any_db_url, "base")
        assert "resources" not in await _tables(db)
        await db.engine.dispose()
        await asyncio.to_thread(upgrade, any_db_url)
        assert "resources" in await _tables(db)
    finally:
        await db.close()


async def test_apply_bumps_generation_only_when_the_spec_changes(any_db_url: str) -> None:
    db = Database(any_db_url)
    try:
        async with db.unit_of_work() as uow:
            first = await ResourceRepository(uow.session).apply(POD)
            await uow.commit()
        assert first.created and first.resource.generation == 1
        async with db.unit_of_work() as uow:
            same = await ResourceRepository(uow.session).apply(POD)
            await uow.commit()
        assert not same.changed
        relabelled = {**POD, "metadata": {**POD["metadata"], "labels": {"pod": "b"}}}
        async with db.unit_of_work() as uow:
            result = await ResourceRepository(uow.session).apply(relabelled)
            await uow.commit()
        assert result.changed and result.resource.generation == 1
        assert result.resource.resource_version == 2
        changed = {**POD, "spec": {"containers": [{"name": "d"}]}}
        async with db.unit_of_work() as uow:
            result = await ResourceRepository(uow.session).apply(changed)
            await uow.commit()
        assert result.resource.generation == 2
        assert result.resource.to_document()["spec"] == {"containers": [{"name": "d"}]}
    finally:
        await db.close()


async def test_leaving_without_commit_stores_nothing(any_db_url: str) -> None:
    db = Database(any_db_url)
    try:
        with pytest.raises(RuntimeError):
            async with db.unit_of_work() as uow:
                await ResourceRepository(uow.session).apply(POD)
                raise RuntimeError("boom")
        async with db.unit_of_work() as uow:
            assert await ResourceRepository(uow.session).list("Pod") == []
    finally:
        await db.close()
