"""verification: per-receipt sampling decision and verifier bookkeeping"""

# Revision ID: 0002_verification
# Revises: 0001_initial
# Create Date: 2026-11-23

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from market.models import UTCDateTime

revision: str = "0002_verification"
down_revision: str | None = "0001_initial"


def upgrade() -> None:
    op.create_table(
        "verification_tasks",
        sa.Column(
            "receipt_id",
            sa.String(40),
            sa.ForeignKey(
                "receipts.id",
                ondelete="CASCADE",
                name="fk_verification_tasks_receipt_id_receipts",
            ),
            nullable=False,
        ),
        sa.Column("verify", sa.Boolean(), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("dispatched_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("receipt_id", name="pk_verification_tasks"),
    )
    op.create_index("ix_verification_tasks_todo", "verification_tasks", ["verify", "outcome"])


def downgrade() -> None:
    op.drop_index("ix_verification_tasks_todo", table_name="verification_tasks")
    op.drop_table("verification_tasks")
