"""SQLAlchemy 2.0 ORM models: the marketplace's tables.

The schema only changes through Alembic migrations (``migrations/``); these classes
mirror it. Money is integer AIDP base units everywhere. Timestamps are UTC and come
back timezone-aware on every backend (see :class:`UTCDateTime`).

Identifiers are short prefixed strings (``acct_…``, ``key_…``, ``node_…``, ``job_…``,
``rcpt_…``) so they read well in logs, receipts and the explorer.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


# ---- buyers ---------------------------------------------------------------------------


class Account(Base):
    __tablename__ = "accounts"
    # The database itself refuses a movement that would spend held funds or go below
    # zero (held >= 0 and balance >= held imply balance >= 0), whatever code asks.
    __table_args__ = (
        CheckConstraint("held >= 0", name="held_not_negative"),
        CheckConstraint("balance >= held", name="balance_covers_held"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("acct"))
    name: Mapped[str] = mapped_column(String(200))
    # Funds owned (base units). ``held`` is the part reserved for running jobs;
    # spendable = balance - held.
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    held: Mapped[int] = mapped_column(BigInteger, default=0)
    wallet: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="account")

    @property
    def available(self) -> int:
        return self.balance - self.held


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    prefix: Mapped[str] = mapped_column(String(24))  # shown in listings: "sk-aidp-AbCd…"
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)

    account: Mapped[Account] = relationship(back_populates="api_keys")


class LedgerEntry(Base):
    """The money journal. ``idempotency_key`` (e.g. ``charge:job_…``) makes replays no-ops."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # deposit | credit | hold | release | charge | fee | node_earning | settle | forfeit |
    # payout | refund | slash
    kind: Mapped[str] = mapped_column(String(24), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(160), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    account_id: Mapped[str | None] = mapped_column(
        ForeignKey("accounts.id"), nullable=True, index=True
    )
    node_id: Mapped[str | None] = mapped_column(
        ForeignKey("nodes.id"), nullable=True, index=True
    )
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    receipt_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    memo: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# ---- nodes ----------------------------------------------------------------------------


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("node"))
    pubkey: Mapped[str] = mapped_column(String(64), unique=True)
    operator_account_id: Mapped[str | None] = mapped_column(
        ForeignKey("accounts.id"), nullable=True
    )
    region: Mapped[str] = mapped_column(String(64), default="local")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    gpus: Mapped[list[Any]] = mapped_column(default=list)
    price_in: Mapped[int] = mapped_column(BigInteger, default=0)  # base units per 1M tokens
    price_out: Mapped[int] = mapped_column(BigInteger, default=0)
    max_concurrency: Mapped[int] = mapped_column(Integer, default=1)
    stake: Mapped[int] = mapped_column(BigInteger, default=0)
    reputation: Mapped[float] = mapped_column(Float, default=0.5)
    jobs_total: Mapped[int] = mapped_column(Integer, default=0)
    jobs_failed: Mapped[int] = mapped_column(Integer, default=0)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)  # EWMA
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # EWMA
    failure_rate: Mapped[float] = mapped_column(Float, default=0.0)  # EWMA of failures
    suspended: Mapped[bool] = mapped_column(Boolean, default=False)
    fraud_count: Mapped[int] = mapped_column(Integer, default=0)
    earned_pending: Mapped[int] = mapped_column(BigInteger, default=0)
    earned_settled: Mapped[int] = mapped_column(BigInteger, default=0)
    last_seen_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    models: Mapped[list[NodeModel]] = relationship(
        back_populates="node", cascade="all, delete-orphan"
    )


class NodeModel(Base):
    __tablename__ = "node_models"
    __table_args__ = (UniqueConstraint("node_id", "model_id", name="uq_node_models_node_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(String(200), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    engine: Mapped[str] = mapped_column(String(64))
    quantization: Mapped[str | None] = mapped_column(String(64), nullable=True)
    context_length: Mapped[int] = mapped_column(Integer)

    node: Mapped[Node] = relationship(back_populates="models")


# ---- jobs and receipts ------------------------------------------------------------------


class Job(Base):
    """One buyer request (a batch makes one job per item)."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_account_created", "account_id", "created_at"),
        Index("ix_jobs_status_deadline", "status", "deadline_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # chat | completion
    request: Mapped[dict[str, Any]] = mapped_column()
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    # the sampler the job's nodes had to use (inference.sampler.SAMPLER); NULL for jobs
    # from before the protocol fixed one: those are judged without the exact check
    sampler: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # indexed with deadline_at (ix_jobs_status_deadline), which also serves status alone
    status: Mapped[str] = mapped_column(String(16), default="running")
    hold_amount: Mapped[int] = mapped_column(BigInteger, default=0)
    charged_amount: Mapped[int] = mapped_column(BigInteger, default=0)  # total buyer charge
    fee_amount: Mapped[int] = mapped_column(BigInteger, default=0)  # market fee within it
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    usage: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    failovers: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Past this a running job is over whatever happened to its process: the hold
    # sweeper finalizes it (failed, nothing charged) and releases the hold.
    deadline_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)

    receipts: Mapped[list[Receipt]] = relationship(back_populates="job", order_by="Receipt.seq")


class Receipt(Base):
    """One node segment of a job (a mid-stream failover makes two) and its challenge state."""

    __tablename__ = "receipts"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_receipts_job_seq"),
        Index("ix_receipts_state_window", "state", "window_closes_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("rcpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    receipt: Mapped[dict[str, Any]] = mapped_column()  # SignedReceipt JSON
    receipt_hash: Mapped[str] = mapped_column(String(64), unique=True)
    signature: Mapped[str] = mapped_column(String(128))
    output_text: Mapped[str] = mapped_column(Text, default="")
    # Output an earlier node streamed before it failed, which this node continued from.
    # Its receipt attests only the digest; the verifier needs the ids themselves.
    continuation_token_ids: Mapped[list[Any] | None] = mapped_column(nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)  # buyer charge for this segment
    node_earning: Mapped[int] = mapped_column(BigInteger, default=0)
    fee: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    window_closes_at: Mapped[datetime] = mapped_column()
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    state_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    challenged: Mapped[bool] = mapped_column(Boolean, default=False)
    verification: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    anchor_id: Mapped[int | None] = mapped_column(ForeignKey("anchors.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="receipts")
    node: Mapped[Node] = relationship()


class ReceiptEvent(Base):
    __tablename__ = "receipt_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    receipt_id: Mapped[str] = mapped_column(ForeignKey("receipts.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


# ---- chain ----------------------------------------------------------------------------


class ChainTransfer(Base):
    """An on-chain movement, recorded before sending so a crash never pays twice."""

    __tablename__ = "chain_transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # payout | slash | refund | anchor | deposit
    idempotency_key: Mapped[str] = mapped_column(String(160), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger, default=0)
    from_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    to_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    memo: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="planned", index=True)
    signature: Mapped[str | None] = mapped_column(String(128), nullable=True)
    blockhash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_valid_block_height: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Anchor(Base):
    __tablename__ = "anchors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    merkle_root: Mapped[str] = mapped_column(String(64))
    receipt_count: Mapped[int] = mapped_column(Integer)
    tx_signature: Mapped[str | None] = mapped_column(String(128), nullable=True)
    slot: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# ---- what the market operator decides ------------------------------------------------------


class ListedModelRow(Base):
    """A model this market lists: the weights it accepts and the vocabulary it counts
    prompts with (``market.listing``). A node may only offer listed id/hash pairs."""

    __tablename__ = "listed_models"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    sha256: Mapped[list[Any]] = mapped_column()  # accepted weight hashes (hex)
    vocabulary: Mapped[str] = mapped_column(String(1000))  # "gguf:<path>" | "fake"
    context_length: Mapped[int] = mapped_column(Integer)  # the most a node may register
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MarketSecret(Base):
    """Secrets the market generates at first start (``market.secrets``), shared by
    every process of one market through its database."""

    __tablename__ = "market_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


JOB_STATUSES = ("running", "completed", "failed", "cancelled")
# escalated: sampled or challenged, and no verifier could judge it: never paid until one does
RECEIPT_STATES = ("pending", "verifying", "settled", "slashed", "escalated")
