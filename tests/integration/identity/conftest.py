"""Databases for the identity tests: SQLite in a tmp dir, and a throw-away PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from identity_live_support import READY_DEADLINE, TOKEN, LiveIdentity, StartIdentity

from ciliate.config import Settings
from ciliate.runner import run_service
from ciliate.stack.ports import free_port
from ciliate.store import Database
from ciliate.store.database import sqlite_url
from ciliate.store.migrate import upgrade_async
from services.identity.service import SPEC

PG_ADMIN = os.environ.get("CILIATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg_admin(sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_ADMIN, timeout=3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _in_thread(coro: Coroutine[Any, Any, None]) -> None:
    """Run set-up outside the test's event loop (session fixtures outlive every loop)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated ``ciliate_test_<random>`` database, dropped after the session."""
    name = f"ciliate_test_{secrets.token_hex(4)}"
    try:
        _in_thread(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN}: {exc}")
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    _in_thread(upgrade_async(url))
    try:
        yield url
    finally:
        _in_thread(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _sqlite(tmp_path: Path) -> Database:
    url = sqlite_url(tmp_path / "identity.db")
    await upgrade_async(url)
    return Database(url)


async def _emptied_pg(url: str) -> Database:
    db = Database(url)
    async with db.unit_of_work() as uow:
        for table in ("identities", "ip_allocations", "node_cidrs", "endpoints"):
            await uow.session.execute(sa.text(f"DELETE FROM {table}"))
        await uow.commit()
    return db


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    db = await _sqlite(tmp_path)
    yield db
    await db.close()


@pytest.fixture
async def pg_db(pg_url: str) -> AsyncIterator[Database]:
    """The session's PostgreSQL database with the identity tables emptied."""
    db = await _emptied_pg(pg_url)
    yield db
    await db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """Each repository test runs on both databases."""
    if request.param == "sqlite":
        db = await _sqlite(tmp_path)
    else:
        db = await _emptied_pg(request.getfixturevalue("pg_url"))
    yield db
    await db.close()


# --- the live service, in-process ----------------------------------------------------------

@pytest.fixture
async def start_identity(
    nats_url: str, db_url: str, tmp_path: Path
) -> AsyncIterator[StartIdentity]:
    """Start replicas with ``await start_identity(node=..., **extra_settings)``; all stop at the
    end of the test. Returns once the replica answers ``/readyz``."""
    started: list[LiveIdentity] = []

    async def start(node: str = "node-1", **extra: str) -> LiveIdentity:
        port = free_port()
        settings = Settings(
            nats_url=nats_url,
            db_url=db_url,
            token=TOKEN,
            node=node,
            state_dir=tmp_path / f"state-{len(started)}",
            http_port=port,
            replica=f"r{len(started)}",
            extra=dict(extra),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(run_service(SPEC, settings, stop))
        session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
        live = LiveIdentity(f"http://127.0.0.1:{port}", settings, session, stop, task)
        started.append(live)
        deadline = time.monotonic() + READY_DEADLINE
        while True:
            if task.done():
                task.result()  # setup failed: raise its error here
                raise AssertionError("identity service exited before it was ready")
            try:
                async with session.get(live.url + "/readyz") as resp:
                    if resp.status == 200:
                        return live
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "identity service not ready in time"
            await asyncio.sleep(0.05)

    try:
        yield start
    finally:
        for live in started:
            live.stop.set()
        for live in started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(live.task, 15)
            await live.session.close()
