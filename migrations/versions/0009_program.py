"""the aidp_market program: verdict signatures, payout epochs and their leaves; the
market-co-signed unbonding requests go (operators unbond with the program directly)"""

# Revision ID: 0009_program
# Revises: 0008_job_sampler
# Create Date: 2026-12-04

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from market.models import UTCDateTime

revision: str = "0009_program"
down_revision: str | None = "0008_job_sampler"


def upgrade() -> None:
    op.create_table(
        "chain_verdicts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("receipt_id", sa.String(40), nullable=False),
        sa.Column("verifier", sa.String(64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("refund", sa.BigInteger(), nullable=False),
        sa.Column("refund_account", sa.String(64), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_chain_verdicts"),
        sa.ForeignKeyConstraint(["receipt_id"], ["receipts.id"],
                                name="fk_chain_verdicts_receipt_id_receipts"),
        sa.UniqueConstraint("receipt_id", "verifier", name="uq_chain_verdicts_receipt_id"),
    )
    op.create_index("ix_chain_verdicts_receipt_id", "chain_verdicts", ["receipt_id"])
    op.create_table(
        "chain_payout_epochs",
        sa.Column("epoch", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("leaf_count", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("epoch", name="pk_chain_payout_epochs"),
        sa.ForeignKeyConstraint(["epoch"], ["chain_transfers.id"],
                                name="fk_chain_payout_epochs_epoch_chain_transfers"),
    )
    op.create_table(
        "chain_payout_leaves",
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("leaf_index", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("epoch", "leaf_index", name="pk_chain_payout_leaves"),
        sa.ForeignKeyConstraint(["epoch"], ["chain_payout_epochs.epoch"],
                                name="fk_chain_payout_leaves_epoch_chain_payout_epochs"),
    )
    op.create_index("ix_chain_payout_leaves_node", "chain_payout_leaves", ["node"])
    op.drop_index("ix_unbonding_requests_node_id", table_name="unbonding_requests")
    op.drop_table("unbonding_requests")


def downgrade() -> None:
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
    op.drop_index("ix_chain_payout_leaves_node", table_name="chain_payout_leaves")
    op.drop_table("chain_payout_leaves")
    op.drop_table("chain_payout_epochs")
    op.drop_index("ix_chain_verdicts_receipt_id", table_name="chain_verdicts")
    op.drop_table("chain_verdicts")
