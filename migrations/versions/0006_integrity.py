"""integrity: listed models, market secrets, balance constraints, job deadlines, owned
allowances, verification retries"""

# Revision ID: 0006_integrity
# Revises: 0005_continuation_prefix
# Create Date: 2026-12-02

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from market.models import UTCDateTime

revision: str = "0006_integrity"
down_revision: str | None = "0005_continuation_prefix"


def upgrade() -> None:
    op.create_table(
        "listed_models",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("sha256", sa.JSON(), nullable=False),
        sa.Column("vocabulary", sa.String(1000), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_listed_models"),
    )
    op.create_table(
        "market_secrets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.String(512), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_market_secrets"),
    )
    with op.batch_alter_table("accounts") as batch:
        batch.create_check_constraint("held_not_negative", "held >= 0")
        batch.create_check_constraint("balance_covers_held", "balance >= held")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("deadline_at", UTCDateTime(), nullable=True))
    # the sweeper's index; it also serves lookups by status alone, so it replaces that one
    op.create_index("ix_jobs_status_deadline", "jobs", ["status", "deadline_at"])
    op.drop_index("ix_jobs_status", table_name="jobs")
    with op.batch_alter_table("verification_tasks") as batch:
        batch.add_column(sa.Column("not_before", UTCDateTime(), nullable=True))
    with op.batch_alter_table("chain_allowances") as batch:
        batch.add_column(sa.Column("shortfall", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("signed_at", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.create_unique_constraint("uq_chain_allowances_wallet", ["wallet"])


def downgrade() -> None:
    with op.batch_alter_table("chain_allowances") as batch:
        batch.drop_constraint("uq_chain_allowances_wallet", type_="unique")
        batch.drop_column("signed_at")
        batch.drop_column("shortfall")
    with op.batch_alter_table("verification_tasks") as batch:
        batch.drop_column("not_before")
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.drop_index("ix_jobs_status_deadline", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("deadline_at")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_constraint("ck_accounts_balance_covers_held", type_="check")
        batch.drop_constraint("ck_accounts_held_not_negative", type_="check")
    op.drop_table("market_secrets")
    op.drop_table("listed_models")
