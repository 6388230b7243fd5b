"""Async engine from a URL and the unit of work that owns each transaction."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached: the API answers 503 and nothing is half-written."""


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` and ``sqlite:///`` and pick the async drivers."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.split(":///", 1)[1]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


class Database:
    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, object] = {"echo": echo, "pool_pre_ping": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # A stack runs several processes against one server (PostgreSQL's default limit is
            # 100 connections): keep each process's share small; CILIATE_DB_POOL raises it.
            size = int(os.environ.get("CILIATE_DB_POOL", "5"))
            kwargs.update(pool_size=size, max_overflow=size)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self)

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            return True
        except (OSError, DBAPIError, OperationalError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")
"""PostgreSQL error classes that mean "not reachable now": connection exception, insufficient
resources (too many connections), operator intervention (shutdown, terminated backend)."""
UNAVAILABLE_SQLSTATES = ("3D000", "55000")
"""Database missing (renamed away), and ``ALLOW_CONNECTIONS false`` (object not in prerequisite
state, raised while connecting)."""


def unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` says the database is out of reach (503) rather than the request wrong."""
    if isinstance(exc, OSError | OperationalError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = str(getattr(exc.orig, "sqlstate", None) or "")
    return state[:2] in UNAVAILABLE_SQLSTATE_CLASSES or state in UNAVAILABLE_SQLSTATES


class UnitOfWork:
    """One transaction. Repositories take ``uow.session`` and never commit; ``commit()`` does.

    Leaving the block without ``commit()`` rolls back, so an error never half-applies a change.
    Connection failures surface as :class:`DatabaseUnavailable`.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("unit of work not entered")
        return self._session

    async def __aenter__(self) -> UnitOfWork:
        self._session = self.db.sessions()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session = self.session
        try:
            if session.in_transaction():
                with contextlib.suppress(Exception):
                    await session.rollback()
        finally:
            with contextlib.suppress(Exception):
                await session.close()
            self._session = None
        if unavailable(exc):
            raise DatabaseUnavailable(str(exc)) from exc

    async def commit(self) -> None:
        await self.session.commit()


@contextlib.asynccontextmanager
async def transaction(db: Database) -> AsyncIterator[AsyncSession]:
    """Shorthand: a unit of work that commits when the block succeeds."""
    async with db.unit_of_work() as uow:
        yield uow.session
        await uow.commit()
