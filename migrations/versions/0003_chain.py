"""chain settlement: which receipts a payout/anchor covers, deposits, allowances, cursors"""

# Revision ID: 0003_chain
# Revises: 0002_verification
# Create Date: 2026-11-23

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from market.models import UTCDateTime

revision: str = "0003_chain"
down_revision: str | None = "0002_verification"


def _item_table(name: str) -> None:
    op.create_table(
        name,
        sa.Column("receipt_id", sa.String(40), nullable=False),
        sa.Column("transfer_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("receipt_id", name=f"pk_{name}"),
        sa.ForeignKeyConstraint(["receipt_id"], ["receipts.id"],
                                name=f"fk_{name}_receipt_id_receipts"),
        sa.ForeignKeyConstraint(["transfer_id"], ["chain_transfers.id"],
                                name=f"fk_{name}_transfer_id_chain_transfers"),
    )
    op.create_index(f"ix_{name}_transfer_id", name, ["transfer_id"])


def upgrade() -> None:
    _item_table("chain_payout_items")
    _item_table("chain_anchor_items")
    op.create_table(
        "chain_deposits",
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("transfer_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=True),
        sa.Column("memo", sa.Text(), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("source_owner", sa.String(64), nullable=True),
        sa.Column("slot", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("credited_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("signature", name="pk_chain_deposits"),
        sa.ForeignKeyConstraint(["transfer_id"], ["chain_transfers.id"],
                                name="fk_chain_deposits_transfer_id_chain_transfers"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name="fk_chain_deposits_account_id_accounts"),
    )
    op.create_index("ix_chain_deposits_status", "chain_deposits", ["status"])
    op.create_table(
        "chain_allowances",
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("wallet", sa.String(64), nullable=False),
        sa.Column("credited", sa.BigInteger(), nullable=False),
        sa.Column("delegated", sa.BigInteger(), nullable=False),
        sa.Column("token_balance", sa.BigInteger(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("pulls", sa.Integer(), nullable=False),
        sa.Column("refreshed_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name="pk_chain_allowances"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name="fk_chain_allowances_account_id_accounts"),
    )
    op.create_table(
        "chain_cursors",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.String(128), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_chain_cursors"),
    )


def downgrade() -> None:
    op.drop_table("chain_cursors")
    op.drop_table("chain_allowances")
    op.drop_index("ix_chain_deposits_status", table_name="chain_deposits")
    op.drop_table("chain_deposits")
    for name in ("chain_anchor_items", "chain_payout_items"):
        op.drop_index(f"ix_{name}_transfer_id", table_name=name)
        op.drop_table(name)
