"""Repository for the generic ``resources`` table. It never commits: the unit of work does."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from ciliate.store.schema import resources

_TOP_LEVEL = ("apiVersion", "kind", "metadata", "status")


@dataclass(frozen=True)
class StoredResource:
    kind: str
    namespace: str
    name: str
    uid: str
    generation: int
    resource_version: int
    api_version: str
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: dict[str, Any]
    status: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    def to_document(self) -> dict[str, Any]:
        """The object as the API returns it (Kubernetes shape)."""
        meta: dict[str, Any] = {
            "name": self.name,
            "uid": self.uid,
            "generation": self.generation,
            "resourceVersion": str(self.resource_version),
            "creationTimestamp": self.created_at.isoformat(),
        }
        if self.namespace:
            meta["namespace"] = self.namespace
        if self.labels:
            meta["labels"] = self.labels
        if self.annotations:
            meta["annotations"] = self.annotations
        doc: dict[str, Any] = {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta}
        doc.update(self.spec)
        if self.status:
            doc["status"] = self.status
        return doc


@dataclass(frozen=True)
class ApplyResult:
    resource: StoredResource
    created: bool
    changed: bool


def split_document(doc: dict[str, Any]) -> dict[str, Any]:
    """Everything but apiVersion/kind/metadata/status: what the generation tracks."""
    return {k: v for k, v in doc.items() if k not in _TOP_LEVEL}


def _row(row: sa.Row[Any]) -> StoredResource:
    m = row._mapping
    return StoredResource(
        kind=m["kind"],
        namespace=m["namespace"],
        name=m["name"],
        uid=m["uid"],
        generation=m["generation"],
        resource_version=m["resource_version"],
        api_version=m["api_version"],
        labels=dict(m["labels"] or {}),
        annotations=dict(m["annotations"] or {}),
        spec=dict(m["spec"] or {}),
        status=dict(m["status"] or {}),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )


class _Unknown:
    """Marks "the caller did not read the stored row": ``apply`` reads it itself."""


UNKNOWN = _Unknown()


class ResourceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, kind: str, namespace: str, name: str) -> StoredResource | None:
        row = (
            await self.session.execute(
                sa.select(resources).where(
                    resources.c.kind == kind,
                    resources.c.namespace == namespace,
                    resources.c.name == name,
                )
            )
        ).first()
        return _row(row) if row is not None else None

    async def list(self, kind: str, namespace: str | None = None) -> list[StoredResource]:
        query = sa.select(resources).where(resources.c.kind == kind)
        if namespace is not None:
            query = query.where(resources.c.namespace == namespace)
        query = query.order_by(resources.c.namespace, resources.c.name)
        return [_row(r) for r in (await self.session.execute(query)).all()]

    async def apply(self, doc: dict[str, Any], *, status: dict[str, Any] | None = None,
                    existing: StoredResource | _Unknown | None = UNKNOWN) -> ApplyResult:
        """Create or update from a validated document; bumps generation when the spec changes.

        ``existing`` is the row as the caller read it in this transaction (None: absent), which
        saves reading it again; the written row comes back with RETURNING, not a second read.
        """
        meta = doc.get("metadata") or {}
        kind, name = str(doc["kind"]), str(meta["name"])
        namespace = str(meta.get("namespace") or "")
        spec = split_document(doc)
        labels = dict(meta.get("labels") or {})
        annotations = dict(meta.get("annotations") or {})
        now = datetime.now(UTC)
        if isinstance(existing, _Unknown):
            existing = await self.get(kind, namespace, name)
        if existing is None:
            values = dict(
                kind=kind, namespace=namespace, name=name, uid=str(meta.get("uid") or uuid.uuid4()),
                generation=1, resource_version=1, api_version=str(doc.get("apiVersion", "")),
                labels=labels, annotations=annotations, spec=spec,
                status=status if status is not None else dict(doc.get("status") or {}),
                created_at=now, updated_at=now,
            )
            row = (
                await self.session.execute(
                    sa.insert(resources).values(**values).returning(*resources.c)
                )
            ).one()
            return ApplyResult(_row(row), created=True, changed=True)
        new_status = status if status is not None else dict(doc.get("status") or existing.status)
        spec_changed = spec != existing.spec
        changed = (
            spec_changed
            or labels != existing.labels
            or annotations != existing.annotations
            or new_status != existing.status
            or str(doc.get("apiVersion", "")) != existing.api_version
        )
        if not changed:
            return ApplyResult(existing, created=False, changed=False)
        row = (await self.session.execute(
            sa.update(resources)
            .where(
                resources.c.kind == kind,
                resources.c.namespace == namespace,
                resources.c.name == name,
            )
            .values(
                generation=existing.generation + (1 if spec_changed else 0),
                resource_version=existing.resource_version + 1,
                api_version=str(doc.get("apiVersion", "")),
                labels=labels,
                annotations=annotations,
                spec=spec,
                status=new_status,
                updated_at=now,
            )
            .returning(*resources.c)
        )).one()
        return ApplyResult(_row(row), created=False, changed=True)

    async def delete(self, kind: str, namespace: str, name: str) -> StoredResource | None:
        existing = await self.get(kind, namespace, name)
        if existing is None:
            return None
        await self.session.execute(
            sa.delete(resources).where(
                resources.c.kind == kind,
                resources.c.namespace == namespace,
                resources.c.name == name,
            )
        )
        return existing
