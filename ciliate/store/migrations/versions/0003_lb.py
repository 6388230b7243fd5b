"""Load-balancer tables: stable backend/frontend ids, ClusterIP and NodePort owners, operator
backend states.

Primary keys settle races between lb replicas: one address or node port has one owner, one id
one key, and (through the unique key) one key one id.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lb_ids",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("key", sa.String(300), nullable=False),
        sa.PrimaryKeyConstraint("kind", "id", name="pk_lb_ids"),
        sa.UniqueConstraint("kind", "key", name="uq_lb_ids_kind_key"),
    )
    op.create_table(
        "lb_addresses",
        sa.Column("address", sa.String(45), nullable=False),
        sa.Column("owner", sa.String(320), nullable=False),
        sa.PrimaryKeyConstraint("address", name="pk_lb_addresses"),
    )
    op.create_index("ix_lb_addresses_owner", "lb_addresses", ["owner"])
    op.create_table(
        "lb_node_ports",
        sa.Column("port", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("protocol", sa.String(8), nullable=False),
        sa.Column("owner", sa.String(320), nullable=False),
        sa.PrimaryKeyConstraint("port", "protocol", name="pk_lb_node_ports"),
    )
    op.create_index("ix_lb_node_ports_owner", "lb_node_ports", ["owner"])
    op.create_table(
        "lb_backend_states",
        sa.Column("backend", sa.String(300), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("backend", name="pk_lb_backend_states"),
    )


def downgrade() -> None:
    op.drop_table("lb_backend_states")
    op.drop_index("ix_lb_node_ports_owner", table_name="lb_node_ports")
    op.drop_table("lb_node_ports")
    op.drop_index("ix_lb_addresses_owner", table_name="lb_addresses")
    op.drop_table("lb_addresses")
    op.drop_table("lb_ids")
