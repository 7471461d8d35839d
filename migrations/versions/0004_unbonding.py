"""stake unbonding: node operators' signed unbond requests"""

# Revision ID: 0004_unbonding
# Revises: 0003_chain
# Create Date: 2026-11-23

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from market.models import UTCDateTime

revision: str = "0004_unbonding"
down_revision: str | None = "0003_chain"


def upgrade() -> None:
    op.create_table(
        "unbonding_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("node_id", sa.String(40), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("requested_at", sa.BigInteger(), nullable=False),
        sa.Column("available_at", UTCDateTime(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("transfer_key", sa.String(160), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_unbonding_requests"),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"],
                                name="fk_unbonding_requests_node_id_nodes"),
        sa.UniqueConstraint("node_id", "requested_at", name="uq_unbonding_requests_node_id"),
    )
    op.create_index("ix_unbonding_requests_node_id", "unbonding_requests", ["node_id"])


def downgrade() -> None:
    op.drop_index("ix_unbonding_requests_node_id", table_name="unbonding_requests")
    op.drop_table("unbonding_requests")
