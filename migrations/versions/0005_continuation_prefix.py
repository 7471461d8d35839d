"""receipts: the continuation prefix a failover segment was given"""

# Revision ID: 0005_continuation_prefix
# Revises: 0004_unbonding
# Create Date: 2026-11-30

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005_continuation_prefix"
down_revision: str | None = "0004_unbonding"


def upgrade() -> None:
    with op.batch_alter_table("receipts") as batch:
        batch.add_column(sa.Column("continuation_token_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("receipts") as batch:
        batch.drop_column("continuation_token_ids")
