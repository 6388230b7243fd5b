"""Identity service tables: identities, IP allocations, node pod CIDRs, endpoints.

The UNIQUE constraint on ``identities.label_key`` is what makes one label set one identity
across replicas; the primary key on ``identities.id`` settles two replicas picking one id.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identities",
        sa.Column("id", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("label_key", sa.Text, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("refcount", sa.Integer, nullable=False, server_default="0"),
        sa.Column("released_at", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_identities"),
        sa.UniqueConstraint("label_key", name="uq_identities_label_key"),
    )
    op.create_table(
        "ip_allocations",
        sa.Column("ip", sa.String(45), nullable=False),
        sa.Column("owner", sa.String(512), nullable=False),
        sa.Column("node", sa.String(253), nullable=False, server_default=""),
        sa.Column("pool", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("ip", name="pk_ip_allocations"),
    )
    op.create_index("ix_ip_allocations_owner", "ip_allocations", ["owner"])
    op.create_index("ix_ip_allocations_pool", "ip_allocations", ["pool"])
    op.create_table(
        "node_cidrs",
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("cidr", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("node", name="pk_node_cidrs"),
        sa.UniqueConstraint("cidr", name="uq_node_cidrs_cidr"),
    )
    op.create_table(
        "endpoints",
        sa.Column("id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("owner", sa.String(512), nullable=False),
        sa.Column("identity", sa.BigInteger, nullable=True),
        sa.Column("record", sa.JSON, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_endpoints"),
        sa.UniqueConstraint("owner", name="uq_endpoints_owner"),
    )


def downgrade() -> None:
    op.drop_table("endpoints")
    op.drop_table("node_cidrs")
    op.drop_index("ix_ip_allocations_pool", table_name="ip_allocations")
    op.drop_index("ix_ip_allocations_owner", table_name="ip_allocations")
    op.drop_table("ip_allocations")
    op.drop_table("identities")
