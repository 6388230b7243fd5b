"""Which database errors are an outage (503) and which are the request's fault."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError

from ciliate.store.database import unavailable


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize("sqlstate", ["55000", "3D000", "57P01", "57P03", "08006", "53300"])
def test_connection_refusals_are_outages(sqlstate: str) -> None:
    assert unavailable(DBAPIError("connect", None, _PgError(sqlstate)))


@pytest.mark.parametrize("sqlstate", ["23505", "22P02", "42P01", "40001"])
def test_request_and_schema_errors_are_not(sqlstate: str) -> None:
    assert not unavailable(DBAPIError("INSERT", None, _PgError(sqlstate)))
    assert not unavailable(IntegrityError("INSERT", None, _PgError(sqlstate)))


def test_plain_exceptions_are_not() -> None:
    assert not unavailable(ValueError("x")) and not unavailable(None)
    assert unavailable(ConnectionRefusedError())
