"""Desired state in SQL: async engine, unit of work, repositories, Alembic migrations."""

from ciliate.store.database import Database, DatabaseUnavailable, UnitOfWork, transaction
from ciliate.store.resources import ApplyResult, ResourceRepository, StoredResource
from ciliate.store.schema import metadata, resources

__all__ = [
    "ApplyResult",
    "Database",
    "DatabaseUnavailable",
    "ResourceRepository",
    "StoredResource",
    "UnitOfWork",
    "metadata",
    "resources",
    "transaction",
]
