"""initial schema: accounts, keys, journal, nodes, jobs, receipts, chain transfers, anchors"""

# Revision ID: 0001_initial
# Revises:
# Create Date: 2026-11-23

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from market.models import UTCDateTime

revision: str = "0001_initial"
down_revision: str | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("wallet", sa.String(64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(24), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])

    op.create_table(
        "nodes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("pubkey", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "operator_account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=True
        ),
        sa.Column("region", sa.String(64), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("price_in", sa.BigInteger(), nullable=False),
        sa.Column("price_out", sa.BigInteger(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("stake", sa.BigInteger(), nullable=False),
        sa.Column("reputation", sa.Float(), nullable=False),
        sa.Column("jobs_total", sa.Integer(), nullable=False),
        sa.Column("jobs_failed", sa.Integer(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        sa.Column("failure_rate", sa.Float(), nullable=False),
        sa.Column("suspended", sa.Boolean(), nullable=False),
        sa.Column("fraud_count", sa.Integer(), nullable=False),
        sa.Column("earned_pending", sa.BigInteger(), nullable=False),
        sa.Column("earned_settled", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "node_models",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "node_id",
            sa.String(40),
            sa.ForeignKey("nodes.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("engine", sa.String(64), nullable=False),
        sa.Column("quantization", sa.String(64), nullable=True),
        sa.Column("context_length", sa.Integer(), nullable=False),
        sa.UniqueConstraint("node_id", "model_id", name="uq_node_models_node_model"),
    )
    op.create_index("ix_node_models_node_id", "node_models", ["node_id"])
    op.create_index("ix_node_models_model_id", "node_models", ["model_id"])

    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("idempotency_key", sa.String(160), nullable=False, unique=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=True),
        sa.Column("node_id", sa.String(40), sa.ForeignKey("nodes.id"), nullable=True),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("receipt_id", sa.String(40), nullable=True),
        sa.Column("memo", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    for column in ("kind", "account_id", "node_id", "job_id", "receipt_id"):
        op.create_index(f"ix_ledger_entries_{column}", "ledger_entries", [column])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("api_key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("hold_amount", sa.BigInteger(), nullable=False),
        sa.Column("charged_amount", sa.BigInteger(), nullable=False),
        sa.Column("fee_amount", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("finish_reason", sa.String(16), nullable=True),
        sa.Column("failovers", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_account_created", "jobs", ["account_id", "created_at"])

    op.create_table(
        "anchors",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("merkle_root", sa.String(64), nullable=False),
        sa.Column("receipt_count", sa.Integer(), nullable=False),
        sa.Column("tx_signature", sa.String(128), nullable=True),
        sa.Column("slot", sa.BigInteger(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )

    op.create_table(
        "receipts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("node_id", sa.String(40), sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("receipt", sa.JSON(), nullable=False),
        sa.Column("receipt_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("output_text", sa.Text(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("node_earning", sa.BigInteger(), nullable=False),
        sa.Column("fee", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("window_closes_at", UTCDateTime(), nullable=False),
        sa.Column("state_changed_at", UTCDateTime(), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("challenged", sa.Boolean(), nullable=False),
        sa.Column("verification", sa.JSON(), nullable=True),
        sa.Column("anchor_id", sa.Integer(), sa.ForeignKey("anchors.id"), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("job_id", "seq", name="uq_receipts_job_seq"),
    )
    op.create_index("ix_receipts_job_id", "receipts", ["job_id"])
    op.create_index("ix_receipts_node_id", "receipts", ["node_id"])
    op.create_index("ix_receipts_state_window", "receipts", ["state", "window_closes_at"])

    op.create_table(
        "receipt_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("receipt_id", sa.String(40), sa.ForeignKey("receipts.id"), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_receipt_events_receipt_id", "receipt_events", ["receipt_id"])

    op.create_table(
        "chain_transfers",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.String(160), nullable=False, unique=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("from_address", sa.String(64), nullable=True),
        sa.Column("to_address", sa.String(64), nullable=True),
        sa.Column("memo", sa.Text(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("signature", sa.String(128), nullable=True),
        sa.Column("blockhash", sa.String(64), nullable=True),
        sa.Column("last_valid_block_height", sa.BigInteger(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_chain_transfers_state", "chain_transfers", ["state"])


def downgrade() -> None:
    for table in (
        "chain_transfers",
        "receipt_events",
        "receipts",
        "anchors",
        "jobs",
        "ledger_entries",
        "node_models",
        "nodes",
        "api_keys",
        "accounts",
    ):
        op.drop_table(table)
