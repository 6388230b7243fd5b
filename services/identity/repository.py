"""SQL state of the identity service: identities, IP allocations, node CIDRs, endpoint ids.

Every method works inside the caller's session and never commits (the unit of work does).
Replicas stay consistent through constraints, not locks held in Python:
- one label set, one identity: ``label_key`` is UNIQUE and new rows go in with
  ``INSERT ... ON CONFLICT DO NOTHING RETURNING``; a row another replica inserted first is then
  taken over by reference (``UPDATE ... RETURNING``);
- no id handed out twice: ``id`` is the primary key; a candidate id another replica took makes
  the insert return nothing for that row, and the allocator picks again.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from ciliate.labels import LabelSet
from ciliate.store import Database, metadata
from services.identity.core.allocator import (
    DEFAULT_GRACE_SECONDS,
    IdPool,
    Scope,
    gc_cutoff,
    reserved_id_for,
    scope_of,
)
from services.identity.core.cidr import cidr_owner, identity_of_owner
from services.identity.core.endpoints import next_endpoint_id
from services.identity.core.ipam import Ipam, IpamError

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("label_key", sa.Text, nullable=False, unique=True),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("refcount", sa.Integer, nullable=False, server_default="0"),
    sa.Column("released_at", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
ip_allocations = sa.Table(
    "ip_allocations",
    metadata,
    sa.Column("ip", sa.String(45), primary_key=True),
    sa.Column("owner", sa.String(512), nullable=False, index=True),
    sa.Column("node", sa.String(253), nullable=False, server_default=""),
    sa.Column("pool", sa.String(64), nullable=True, index=True),
)
node_cidrs = sa.Table(
    "node_cidrs",
    metadata,
    sa.Column("node", sa.String(253), primary_key=True),
    sa.Column("cidr", sa.String(64), nullable=False, unique=True),
)
endpoints = sa.Table(
    "endpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("owner", sa.String(512), nullable=False, unique=True),
    sa.Column("identity", sa.BigInteger, nullable=True),
    sa.Column("record", sa.JSON, nullable=True),
)
"""One row per pod: its endpoint id, the identity it holds a reference to, its KV record."""

PREFIX_POOL = "cidr"
"""``ip_allocations.pool`` of rows holding a CIDR identity's prefix (pod rows name a node CIDR)."""
REQUIRED_TABLES = ("resources", "identities", "ip_allocations", "node_cidrs", "endpoints")
"""What the service reads and writes; created by ``ciliate db upgrade`` (migrations 0001, 0002)."""

T = TypeVar("T")
CHUNK = 1000
"""Rows per statement: well inside SQLite's and asyncpg's bound-parameter limits."""
MAX_ATTEMPTS = 50
REFRESH_AFTER = 4
"""Refused slot inserts after which a pod apply adds the committed slots to its view."""


class SchemaMissing(RuntimeError):
    """The database has not been migrated: the service cannot start."""


async def missing_tables(db: Database) -> list[str]:
    """Required tables the database lacks (empty when migrated)."""
    async with db.engine.connect() as conn:
        present = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
    return [name for name in REQUIRED_TABLES if name not in present]


class AllocationFailed(RuntimeError):
    """Candidate ids kept colliding with other replicas' (a near-full pool)."""


class IpConflict(ValueError):
    """The address is already held by another pod."""

    def __init__(self, ip: str, holder: str) -> None:
        super().__init__(f"{ip} is already assigned to {holder}")
        self.ip = ip
        self.holder = holder


@dataclass(frozen=True)
class Identity:
    id: int
    labels: list[str]
    refcount: int = 0
    released_at: float | None = None


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure and deadlock: the transaction as a whole may simply run again."""


def is_retryable(exc: BaseException) -> bool:
    """A PostgreSQL deadlock or serialization failure (SQLite serialises writers instead)."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code is None and orig is not None:
        code = getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    return code in RETRYABLE_SQLSTATES or "deadlock detected" in str(exc)


async def run_in_transaction(
    db: Database, work: Callable[[AsyncSession], Awaitable[T]], attempts: int = 5
) -> T:
    """Run ``work`` in its own unit of work and commit; run it again after a deadlock."""
    for attempt in range(1, attempts + 1):
        try:
            async with db.unit_of_work() as uow:
                result = await work(uow.session)
                await uow.commit()
                return result
        except DBAPIError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
    raise AssertionError("unreachable")


def _insert(session: AsyncSession, table: sa.Table) -> Any:
    """The dialect's INSERT that supports ``on_conflict_do_nothing``."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


_PG_TAKE = sa.text(
    """
    UPDATE identities SET refcount = refcount + :count, released_at = NULL
    WHERE id IN (
        SELECT id FROM identities WHERE label_key = ANY(CAST(:keys AS text[]))
        ORDER BY label_key FOR UPDATE
    )
    RETURNING id, label_key
    """
)
"""PostgreSQL form of taking references: rows locked in key order (no deadlock between
replicas taking overlapping sets), the keys passed as one array."""
_PG_INSERT = sa.text(
    """
    INSERT INTO identities (id, label_key, labels, refcount, released_at, created_at)
    SELECT t.id, t.key, CAST(t.labels AS json), t.refs, NULL, :now
    FROM unnest(CAST(:ids AS bigint[]), CAST(:keys AS text[]), CAST(:labels AS text[]),
                CAST(:refs AS integer[])) AS t(id, key, labels, refs)
    ON CONFLICT DO NOTHING
    RETURNING id, label_key
    """
)
"""PostgreSQL form of inserting new identities: four array parameters for any batch size."""


@dataclass
class IdentityAllocator:
    """Per-process allocator state (the id pools, a cache of taken ids) plus the SQL steps."""

    grace: float = DEFAULT_GRACE_SECONDS
    rng: random.Random = field(default_factory=random.Random)
    pools: dict[Scope, IdPool] = field(default_factory=dict)
    _loaded: bool = False

    def pool(self, scope: Scope) -> IdPool:
        if scope not in self.pools:
            self.pools[scope] = IdPool(scope, rng=self.rng)
        return self.pools[scope]

    async def _load_taken(self, session: AsyncSession) -> None:
        rows = await session.execute(sa.select(identities.c.id))
        ids = [int(r[0]) for r in rows]
        for scope in Scope:
            self.pool(scope).taken = set()
            self.pool(scope).mark_taken(ids)
        self._loaded = True

    async def allocate(
        self,
        session: AsyncSession,
        label_sets: Sequence[LabelSet],
        now: float | None = None,
        created: set[int] | None = None,
    ) -> list[int]:
        """One identity per label set (same set, same id), each taking one reference.

        Ids of rows this call inserted are added to ``created`` when given. Reserved label
        sets map to their reserved numbers and are not stored.
        """
        now = time.time() if now is None else now
        if not self._loaded:
            await self._load_taken(session)
        result: dict[str, int] = {}
        wanted: Counter[str] = Counter()
        by_key: dict[str, LabelSet] = {}
        for ls in label_sets:
            reserved = reserved_id_for(ls)
            key = ls.canonical()
            if reserved is not None:
                result[key] = reserved
                continue
            wanted[key] += 1
            by_key[key] = ls
        missing = await self._take_existing(session, wanted, result)
        attempts = 0
        while missing:
            attempts += 1
            if attempts > MAX_ATTEMPTS:
                raise AllocationFailed(f"{len(missing)} label sets could not get an id")
            missing = await self._insert_new(
                session, sorted(missing), wanted, by_key, now, result, created
            )
            if missing:
                missing = await self._take_existing(
                    session, Counter({k: wanted[k] for k in missing}), result
                )
        return [result[ls.canonical()] for ls in label_sets]

    async def _take_existing(
        self, session: AsyncSession, wanted: Counter[str], result: dict[str, int]
    ) -> set[str]:
        """Add references to rows that exist; returns the keys that have no row."""
        by_count: dict[int, list[str]] = {}
        for key, count in wanted.items():
            by_count.setdefault(count, []).append(key)
        missing = set(wanted)
        postgres = _is_postgres(session)
        for count, keys in by_count.items():
            if postgres:
                # One array parameter instead of a bind per key: compiling thousands of binds
                # cost more than the statement itself.
                rows = await session.execute(
                    _PG_TAKE, {"keys": sorted(keys), "count": count}
                )
                for ident, key in rows:
                    result[key] = int(ident)
                    missing.discard(key)
                continue
            for chunk in _chunks(sorted(keys)):
                # Lock the rows in key order first, so two replicas taking references to
                # overlapping label sets queue behind each other instead of deadlocking.
                in_key_order = (
                    sa.select(identities.c.id)
                    .where(identities.c.label_key.in_(chunk))
                    .order_by(identities.c.label_key)
                    .with_for_update()
                )
                rows = await session.execute(
                    identities.update()
                    .where(identities.c.id.in_(in_key_order.scalar_subquery()))
                    .values(refcount=identities.c.refcount + count, released_at=None)
                    .returning(identities.c.id, identities.c.label_key)
                )
                for ident, key in rows:
                    result[key] = int(ident)
                    missing.discard(key)
        return missing

    async def _insert_new(
        self,
        session: AsyncSession,
        keys: list[str],
        wanted: Counter[str],
        by_key: dict[str, LabelSet],
        now: float,
        result: dict[str, int],
        created: set[int] | None,
    ) -> set[str]:
        """Insert rows with fresh candidate ids; returns the keys that did not go in."""
        rows: list[dict[str, Any]] = []
        for scope in Scope:
            scoped = [k for k in keys if scope_of(by_key[k]) is scope]
            ids = self.pool(scope).candidates(len(scoped))
            rows += [
                {
                    "id": ident,
                    "label_key": key,
                    "labels": by_key[key].sorted_strings(),
                    "refcount": wanted[key],
                    "released_at": None,
                    "created_at": now,
                }
                for key, ident in zip(scoped, ids, strict=True)
            ]
        inserted: set[str] = set()
        postgres = _is_postgres(session)
        for chunk in ([rows] if postgres else _chunks(rows)):
            if postgres:
                got = list(await session.execute(_PG_INSERT, {
                    "ids": [r["id"] for r in chunk],
                    "keys": [r["label_key"] for r in chunk],
                    "labels": [json.dumps(r["labels"]) for r in chunk],
                    "refs": [r["refcount"] for r in chunk],
                    "now": now,
                }))
            else:
                stmt = (
                    _insert(session, identities)
                    .values(list(chunk))
                    .on_conflict_do_nothing()
                    .returning(identities.c.id, identities.c.label_key)
                )
                got = list(await session.execute(stmt))
            for ident, key in got:
                result[key] = int(ident)
                inserted.add(key)
                if created is not None:
                    created.add(int(ident))
        # Every candidate id is now either ours or someone else's: never offer it again.
        for scope in Scope:
            self.pool(scope).mark_taken(row["id"] for row in rows)
        return set(keys) - inserted

    async def release(
        self, session: AsyncSession, ids: Sequence[int], now: float | None = None
    ) -> list[int]:
        """Drop one reference per listed id; returns the ids now unreferenced."""
        now = time.time() if now is None else now
        counts = Counter(i for i in ids if any(s.contains(i) for s in Scope))
        by_count: dict[int, list[int]] = {}
        for ident, count in counts.items():
            by_count.setdefault(count, []).append(ident)
        unreferenced: list[int] = []
        for count, group in by_count.items():
            for chunk in _chunks(sorted(group)):
                left = sa.case(
                    (identities.c.refcount > count, identities.c.refcount - count), else_=0
                )
                rows = await session.execute(
                    identities.update()
                    .where(identities.c.id.in_(chunk))
                    .values(
                        refcount=left,
                        released_at=sa.case(
                            (identities.c.refcount > count, None),
                            else_=sa.func.coalesce(identities.c.released_at, now),
                        ),
                    )
                    .returning(identities.c.id, identities.c.refcount)
                )
                unreferenced += [int(i) for i, refs in rows if refs == 0]
        return sorted(unreferenced)

    async def collect_garbage(self, session: AsyncSession, now: float | None = None) -> list[int]:
        """Delete identities unreferenced for the whole grace period; their ids become free."""
        now = time.time() if now is None else now
        rows = await session.execute(
            identities.delete()
            .where(identities.c.refcount == 0)
            .where(identities.c.released_at <= gc_cutoff(now, self.grace))
            .returning(identities.c.id)
        )
        gone = sorted(int(r[0]) for r in rows)
        for pool in self.pools.values():
            pool.mark_free(gone)
        return gone

    async def lookup(self, session: AsyncSession, keys: Sequence[str]) -> dict[str, int]:
        """Canonical label key -> id for the keys that have an identity (no reference taken)."""
        found: dict[str, int] = {}
        for chunk in _chunks(sorted(set(keys))):
            rows = await session.execute(
                sa.select(identities.c.id, identities.c.label_key).where(
                    identities.c.label_key.in_(chunk)
                )
            )
            found.update({key: int(ident) for ident, key in rows})
        return found

    async def get(self, session: AsyncSession, ident: int) -> Identity | None:
        row = (await session.execute(sa.select(identities).where(identities.c.id == ident))).first()
        return None if row is None else _identity(row)

    async def list_all(self, session: AsyncSession) -> list[Identity]:
        rows = await session.execute(sa.select(identities).order_by(identities.c.id))
        return [_identity(r) for r in rows]


def _identity(row: Any) -> Identity:
    return Identity(
        id=int(row.id),
        labels=list(row.labels),
        refcount=int(row.refcount),
        released_at=row.released_at,
    )


@dataclass(frozen=True)
class IpAllocation:
    ip: str
    owner: str
    node: str


ENDPOINT_LOCKS = 0x1D01
ADDRESS_LOCKS = 0x1D02
"""PostgreSQL advisory lock spaces: a transaction inserting an endpoint id or an address holds
its lock until it ends, so a concurrent one trying the same slot moves on at once instead of
waiting on the uncommitted row (which would serialise every pod apply on one slot)."""

_PG_INSERT_ENDPOINT = sa.text(
    """
    INSERT INTO endpoints (id, owner, identity, record)
    SELECT CAST(:id AS integer), CAST(:owner AS varchar), CAST(:identity AS bigint),
           CAST(:record AS json)
    WHERE pg_try_advisory_xact_lock(:space, CAST(:id AS integer))
    ON CONFLICT DO NOTHING
    RETURNING id
    """
)
_PG_INSERT_ADDRESS = sa.text(
    """
    INSERT INTO ip_allocations (ip, owner, node, pool)
    SELECT CAST(:ip AS varchar), CAST(:owner AS varchar), CAST(:node AS varchar),
           CAST(:pool AS varchar)
    WHERE pg_try_advisory_xact_lock(:space, hashtext(CAST(:ip AS text)))
    ON CONFLICT DO NOTHING
    RETURNING ip
    """
)


@dataclass
class AddressSlots:
    """One process's view of the endpoint ids and pod addresses taken, and of node CIDRs.

    Picking a new pod's endpoint id and address from this view replaces reading every taken id
    (the whole ``endpoints`` table) and every address of the node's CIDR per pod. It is a hint:
    the primary keys still decide, a slot another replica took is learnt from the refused
    insert, and a view that runs out is read again from SQL. Node CIDRs are never reassigned, so
    a node's CIDR seen committed is cached for good.
    """

    endpoint_ids: set[int] | None = None
    endpoint_floor: int = 0
    """Every endpoint id below this is in ``endpoint_ids`` (where the lowest-free search starts)."""
    addresses: dict[str, set[str]] = field(default_factory=dict)
    node_cidrs: dict[str, str] = field(default_factory=dict)

    def forget_addresses(self, ips: Iterable[str], ipam: Ipam) -> None:
        for ip in ips:
            pool = ipam.node_cidr_of(ip)
            if pool is not None and pool in self.addresses:
                self.addresses[pool].discard(ip)


class AddressRepository:
    """Pod addresses, node pod CIDRs and endpoint ids."""

    def __init__(
        self, session: AsyncSession, ipam: Ipam | None = None, slots: AddressSlots | None = None
    ) -> None:
        self.session = session
        self.ipam = ipam or Ipam()
        self.slots = slots if slots is not None else AddressSlots()
        self._wrote_node_cidrs = False

    async def node_cidr(self, node: str) -> str:
        """The node's pod CIDR, assigning the next free one on first use."""
        cached = self.slots.node_cidrs.get(node)
        if cached is not None:
            return cached
        for attempt in range(MAX_ATTEMPTS):
            row = (
                await self.session.execute(
                    sa.select(node_cidrs.c.cidr).where(node_cidrs.c.node == node)
                )
            ).first()
            if row is not None:
                if attempt == 0 and not self._wrote_node_cidrs:
                    # Committed before this transaction wrote anything: safe to keep.
                    self.slots.node_cidrs[node] = str(row[0])
                return str(row[0])
            taken = {str(r[0]) for r in await self.session.execute(sa.select(node_cidrs.c.cidr))}
            cidr = self.ipam.next_node_cidr(taken)
            self._wrote_node_cidrs = True
            await self.session.execute(
                _insert(self.session, node_cidrs)
                .values(node=node, cidr=cidr)
                .on_conflict_do_nothing()
            )
        raise IpamError("spec.nodeName", f"could not assign a pod CIDR to node {node}")

    async def adopt_node_cidr(self, node: str, cidr: str) -> None:
        """Record ``cidr`` as the node's pod CIDR unless the node or the CIDR is taken already
        (a pod applied with an address tells us which /24 its node uses)."""
        if self.slots.node_cidrs.get(node) == cidr:
            return
        self._wrote_node_cidrs = True
        await self.session.execute(
            _insert(self.session, node_cidrs).values(node=node, cidr=cidr).on_conflict_do_nothing()
        )

    async def node_of_cidr(self, cidr: str) -> str | None:
        row = (
            await self.session.execute(
                sa.select(node_cidrs.c.node).where(node_cidrs.c.cidr == cidr)
            )
        ).first()
        return None if row is None else str(row[0])

    async def list_node_cidrs(self) -> dict[str, str]:
        rows = await self.session.execute(sa.select(node_cidrs.c.node, node_cidrs.c.cidr))
        return {str(n): str(c) for n, c in rows}

    async def claim(self, ip: str, owner: str, node: str) -> None:
        """Record a given address; IpConflict if another owner holds it."""
        pool = self.ipam.node_cidr_of(ip)
        if pool is not None and pool in self.slots.addresses:
            self.slots.addresses[pool].add(ip)
        got = (
            await self.session.execute(
                _insert(self.session, ip_allocations)
                .values(ip=ip, owner=owner, node=node, pool=pool)
                .on_conflict_do_nothing()
                .returning(ip_allocations.c.ip)
            )
        ).first()
        if got is not None:
            return
        holder = (
            await self.session.execute(
                sa.select(ip_allocations.c.owner).where(ip_allocations.c.ip == ip)
            )
        ).scalar_one()
        if holder != owner:
            raise IpConflict(ip, str(holder))
        await self.session.execute(
            ip_allocations.update().where(ip_allocations.c.ip == ip).values(node=node)
        )

    async def _taken_addresses(self, cidr: str, reload: bool = False) -> set[str]:
        taken = self.slots.addresses.get(cidr)
        if taken is None or reload:
            rows = await self.session.execute(
                sa.select(ip_allocations.c.ip).where(ip_allocations.c.pool == cidr)
            )
            taken = self.slots.addresses[cidr] = {str(r[0]) for r in rows}
        return taken

    async def _learn_addresses(self, cidr: str, taken: set[str]) -> None:
        """Add the CIDR's committed addresses to the view (another replica took a run of them:
        learning them one refused insert at a time would not end within the attempts)."""
        rows = await self.session.execute(
            sa.select(ip_allocations.c.ip).where(ip_allocations.c.pool == cidr)
        )
        taken.update(str(r[0]) for r in rows)

    async def _insert_address(self, ip: str, owner: str, node: str, pool: str) -> bool:
        if _is_postgres(self.session):
            got = await self.session.execute(_PG_INSERT_ADDRESS, {
                "ip": ip, "owner": owner, "node": node, "pool": pool, "space": ADDRESS_LOCKS,
            })
        else:
            got = await self.session.execute(
                _insert(self.session, ip_allocations)
                .values(ip=ip, owner=owner, node=node, pool=pool)
                .on_conflict_do_nothing()
                .returning(ip_allocations.c.ip)
            )
        return got.first() is not None

    async def allocate(self, owner: str, node: str) -> str:
        """The lowest free address (as far as this process knows) of the node's pod CIDR,
        recorded for ``owner``."""
        cidr = await self.node_cidr(node)
        taken = await self._taken_addresses(cidr)
        reloaded = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                ip = self.ipam.next_address(cidr, taken)
            except IpamError:
                if reloaded:
                    raise
                taken = await self._taken_addresses(cidr, reload=True)
                reloaded = True
                continue
            taken.add(ip)  # reserved before the await: concurrent requests pick another
            if await self._insert_address(ip, owner, node, cidr):
                return ip
            if attempt % REFRESH_AFTER == 0:
                await self._learn_addresses(cidr, taken)
        raise IpamError("status.podIP", f"could not allocate an address in {cidr}")

    async def of_owner(self, owner: str) -> list[str]:
        rows = await self.session.execute(
            sa.select(ip_allocations.c.ip).where(ip_allocations.c.owner == owner)
        )
        return sorted(str(r[0]) for r in rows)

    async def release(self, owner: str, keep: Iterable[str] = ()) -> list[str]:
        """Free the owner's addresses except ``keep``; returns what was freed."""
        stmt = ip_allocations.delete().where(ip_allocations.c.owner == owner)
        kept = list(keep)
        if kept:
            stmt = stmt.where(ip_allocations.c.ip.not_in(kept))
        rows = await self.session.execute(stmt.returning(ip_allocations.c.ip))
        freed = sorted(str(r[0]) for r in rows)
        self.slots.forget_addresses(freed, self.ipam)
        return freed

    async def list_all(self) -> list[IpAllocation]:
        rows = await self.session.execute(sa.select(ip_allocations).order_by(ip_allocations.c.ip))
        return [IpAllocation(str(r.ip), str(r.owner), str(r.node)) for r in rows]

    async def endpoint_id(self, owner: str) -> int:
        """The owner's endpoint id, allocating the lowest free one on first use."""
        ident, _held, _record = await self.endpoint_state(owner)
        if ident is not None:
            return ident
        created, _inserted = await self.create_endpoint(owner, None, lambda _id: None)
        return created

    async def _taken_endpoint_ids(self, reload: bool = False) -> set[int]:
        if self.slots.endpoint_ids is None or reload:
            rows = await self.session.execute(sa.select(endpoints.c.id))
            self.slots.endpoint_ids = {int(r[0]) for r in rows}
            self.slots.endpoint_floor = 0
        return self.slots.endpoint_ids

    async def create_endpoint(
        self,
        owner: str,
        identity: int | None,
        record_for: Callable[[int], dict[str, Any] | None],
    ) -> tuple[int, bool]:
        """Insert the endpoint row of an owner that has none, with the lowest endpoint id free
        as far as this process knows and the record made for that id: (id, True). If the
        owner got a row meanwhile (the same pod applied concurrently), (that row's id, False)
        and the row is left as it is."""
        taken = await self._taken_endpoint_ids()
        reloaded = False
        postgres = _is_postgres(self.session)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if attempt % REFRESH_AFTER == 0:
                # Another replica took a run of ids (a group of applies commits dozens at
                # once): learn them all rather than one refused insert at a time.
                taken.update(int(r[0]) for r in await self.session.execute(
                    sa.select(endpoints.c.id)))
            try:
                ident = next_endpoint_id(taken, start=self.slots.endpoint_floor)
            except RuntimeError:
                if reloaded:
                    raise
                taken = await self._taken_endpoint_ids(reload=True)
                reloaded = True
                continue
            taken.add(ident)  # reserved before the await: concurrent requests pick another
            self.slots.endpoint_floor = ident + 1
            record = record_for(ident)
            if postgres:
                got = await self.session.execute(_PG_INSERT_ENDPOINT, {
                    "id": ident, "owner": owner, "identity": identity,
                    "record": None if record is None else json.dumps(record),
                    "space": ENDPOINT_LOCKS,
                })
            else:
                got = await self.session.execute(
                    _insert(self.session, endpoints)
                    .values(id=ident, owner=owner, identity=identity, record=record)
                    .on_conflict_do_nothing()
                    .returning(endpoints.c.id)
                )
            if got.first() is not None:
                return ident, True
            existing, _held, _record = await self.endpoint_state(owner)
            if existing is not None:
                return existing, False
        raise RuntimeError(f"could not allocate an endpoint id for {owner}")

    async def release_endpoint_id(self, owner: str) -> None:
        rows = await self.session.execute(
            endpoints.delete().where(endpoints.c.owner == owner).returning(endpoints.c.id)
        )
        if self.slots.endpoint_ids is not None:
            freed = [int(r[0]) for r in rows]
            self.slots.endpoint_ids.difference_update(freed)
            self.slots.endpoint_floor = min([self.slots.endpoint_floor, *freed])

    async def endpoint(self, owner: str) -> tuple[int | None, dict[str, Any] | None]:
        """(identity held, KV record) of a pod's endpoint, or (None, None)."""
        _ident, held, record = await self.endpoint_state(owner)
        return held, record

    async def endpoint_state(
        self, owner: str
    ) -> tuple[int | None, int | None, dict[str, Any] | None]:
        """(endpoint id, identity held, KV record) of a pod's endpoint, or Nones."""
        row = (
            await self.session.execute(
                sa.select(endpoints.c.id, endpoints.c.identity, endpoints.c.record).where(
                    endpoints.c.owner == owner
                )
            )
        ).first()
        if row is None:
            return None, None, None
        return int(row[0]), (None if row[1] is None else int(row[1])), row[2]

    async def save_endpoint(self, owner: str, identity: int, record: dict[str, Any]) -> None:
        await self.session.execute(
            endpoints.update()
            .where(endpoints.c.owner == owner)
            .values(identity=identity, record=record)
        )

    async def claim_prefixes(self, prefixes: dict[str, int]) -> list[tuple[str, int]]:
        """Point each prefix at its CIDR identity; returns the (prefix, id) pairs that are new
        or changed (the ipcache entries to publish)."""
        rows = [
            {"ip": prefix, "owner": cidr_owner(ident), "node": "", "pool": PREFIX_POOL}
            for prefix, ident in sorted(prefixes.items())
        ]
        changed: list[tuple[str, int]] = []
        for chunk in _chunks(rows):
            stmt = _insert(self.session, ip_allocations).values(list(chunk))
            stmt = stmt.on_conflict_do_update(
                index_elements=[ip_allocations.c.ip],
                set_={"owner": stmt.excluded.owner, "pool": PREFIX_POOL},
                where=ip_allocations.c.owner != stmt.excluded.owner,
            ).returning(ip_allocations.c.ip, ip_allocations.c.owner)
            for prefix, owner in await self.session.execute(stmt):
                ident = identity_of_owner(str(owner))
                if ident is not None:
                    changed.append((str(prefix), ident))
        return changed

    async def release_prefixes(self, ids: Iterable[int]) -> list[str]:
        """Drop the prefixes of these (now unreferenced) CIDR identities; returns them."""
        owners = sorted({cidr_owner(i) for i in ids})
        freed: list[str] = []
        for chunk in _chunks(owners):
            rows = await self.session.execute(
                ip_allocations.delete()
                .where(ip_allocations.c.owner.in_(chunk))
                .returning(ip_allocations.c.ip)
            )
            freed += [str(r[0]) for r in rows]
        return sorted(freed)

    async def list_prefixes(self) -> list[tuple[str, int]]:
        """Every (prefix, CIDR identity) pair held for other services."""
        rows = await self.session.execute(
            sa.select(ip_allocations.c.ip, ip_allocations.c.owner)
            .where(ip_allocations.c.pool == PREFIX_POOL)
            .order_by(ip_allocations.c.ip)
        )
        out = []
        for prefix, owner in rows:
            ident = identity_of_owner(str(owner))
            if ident is not None:
                out.append((str(prefix), ident))
        return out

    async def list_endpoints(self) -> list[dict[str, Any]]:
        rows = await self.session.execute(
            sa.select(endpoints.c.record)
            .where(endpoints.c.record.is_not(None))
            .order_by(endpoints.c.id)
        )
        return [dict(r[0]) for r in rows]
