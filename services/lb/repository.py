"""SQL state of the lb service (migration 0003): ids, address and node-port owners, states.

Every method works inside the caller's session and never commits. Primary keys arbitrate
between replicas: a racing insert fails with IntegrityError, which the caller turns into a
retry (ids) or a 409 (an address or node port somebody else owns).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from ciliate.store import metadata

lb_ids = sa.Table(
    "lb_ids",
    metadata,
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("key", sa.String(300), nullable=False),
    sa.UniqueConstraint("kind", "key", name="uq_lb_ids_kind_key"),
)
"""Stable ids: kind ``backend`` (key ``10.0.0.1:80/TCP``) or ``frontend`` (key + scope)."""
lb_addresses = sa.Table(
    "lb_addresses",
    metadata,
    sa.Column("address", sa.String(45), primary_key=True),
    sa.Column("owner", sa.String(320), nullable=False, index=True),
)
lb_node_ports = sa.Table(
    "lb_node_ports",
    metadata,
    sa.Column("port", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("protocol", sa.String(8), primary_key=True),
    sa.Column("owner", sa.String(320), nullable=False, index=True),
)
lb_backend_states = sa.Table(
    "lb_backend_states",
    metadata,
    sa.Column("backend", sa.String(300), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
)

BACKEND = "backend"
FRONTEND = "frontend"
MAX_ID = 0xFFFF_FFFE
"""Cilium's backend ids are uint32 and all-ones marks an empty Maglev slot."""
CHUNK = 500


class Conflict(Exception):
    """An address or node port another Service owns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class LbRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- ids -----------------------------------------------------------------------------

    async def ids(self, kind: str, keys: Collection[str] | None = None) -> dict[str, int]:
        query = sa.select(lb_ids.c.key, lb_ids.c.id).where(lb_ids.c.kind == kind)
        if keys is None:
            return {k: i for k, i in (await self.session.execute(query)).all()}
        out: dict[str, int] = {}
        ordered = sorted(keys)
        for start in range(0, len(ordered), CHUNK):
            chunk = ordered[start:start + CHUNK]
            rows = await self.session.execute(query.where(lb_ids.c.key.in_(chunk)))
            out.update({k: i for k, i in rows.all()})
        return out

    async def allocate_ids(self, kind: str, keys: Iterable[str]) -> dict[str, int]:
        """Ids for ``keys``: the existing ones, new ones above the highest for the rest.

        A replica inserting the same key or id first makes this raise IntegrityError; the
        caller retries the transaction and then finds the other replica's rows.
        """
        wanted = set(keys)
        found = await self.ids(kind, wanted)
        missing = sorted(wanted - set(found))
        if missing:
            top = (await self.session.execute(
                sa.select(sa.func.max(lb_ids.c.id)).where(lb_ids.c.kind == kind))).scalar()
            first = int(top or 0) + 1
            if first + len(missing) - 1 > MAX_ID:
                raise RuntimeError(f"{kind} ids exhausted")
            rows = [{"kind": kind, "id": first + n, "key": key} for n, key in enumerate(missing)]
            for start in range(0, len(rows), CHUNK):
                await self.session.execute(sa.insert(lb_ids), rows[start:start + CHUNK])
            found.update({key: first + n for n, key in enumerate(missing)})
        return found

    # --- ClusterIPs and node ports -------------------------------------------------------

    async def taken_addresses(self) -> set[str]:
        return set((await self.session.execute(sa.select(lb_addresses.c.address))).scalars())

    async def taken_node_ports(self, protocol: str) -> set[int]:
        rows = await self.session.execute(
            sa.select(lb_node_ports.c.port).where(lb_node_ports.c.protocol == protocol))
        return {int(p) for p in rows.scalars()}

    async def addresses_of(self, owner: str) -> set[str]:
        rows = await self.session.execute(
            sa.select(lb_addresses.c.address).where(lb_addresses.c.owner == owner))
        return set(rows.scalars())

    async def node_ports_of(self, owner: str) -> set[tuple[int, str]]:
        rows = await self.session.execute(
            sa.select(lb_node_ports.c.port, lb_node_ports.c.protocol)
            .where(lb_node_ports.c.owner == owner))
        return {(int(p), str(proto)) for p, proto in rows.all()}

    async def claim_address(self, address: str, owner: str, field: str) -> None:
        row = (await self.session.execute(
            sa.select(lb_addresses.c.owner).where(lb_addresses.c.address == address))).first()
        if row is not None and row[0] != owner:
            raise Conflict(field, f"{address} is already allocated to Service {row[0]}")
        if row is None:
            await self.session.execute(sa.insert(lb_addresses).values(address=address,
                                                                       owner=owner))

    async def claim_node_port(self, port: int, protocol: str, owner: str, field: str) -> None:
        row = (await self.session.execute(
            sa.select(lb_node_ports.c.owner).where(lb_node_ports.c.port == port,
                                                   lb_node_ports.c.protocol == protocol))
               ).first()
        if row is not None and row[0] != owner:
            raise Conflict(field, f"node port {port}/{protocol} is already allocated to "
                                  f"Service {row[0]}")
        if row is None:
            await self.session.execute(
                sa.insert(lb_node_ports).values(port=port, protocol=protocol, owner=owner))

    async def release(self, owner: str, keep_addresses: Collection[str] = (),
                      keep_ports: Collection[tuple[int, str]] = ()) -> None:
        """Free what ``owner`` holds beyond what it keeps."""
        for address in await self.addresses_of(owner) - set(keep_addresses):
            await self.session.execute(
                sa.delete(lb_addresses).where(lb_addresses.c.address == address))
        for port, protocol in await self.node_ports_of(owner) - set(keep_ports):
            await self.session.execute(sa.delete(lb_node_ports).where(
                lb_node_ports.c.port == port, lb_node_ports.c.protocol == protocol))

    # --- operator backend states ---------------------------------------------------------

    async def backend_states(self) -> dict[str, str]:
        rows = await self.session.execute(
            sa.select(lb_backend_states.c.backend, lb_backend_states.c.state))
        return {b: s for b, s in rows.all()}

    async def set_backend_state(self, backend: str, state: str | None) -> None:
        await self.session.execute(
            sa.delete(lb_backend_states).where(lb_backend_states.c.backend == backend))
        if state is not None:
            await self.session.execute(
                sa.insert(lb_backend_states).values(backend=backend, state=state))
