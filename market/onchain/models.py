"""The chain layer's own tables (migration ``0003_chain``).

``chain_transfers`` (in ``market.models``) is the exactly-once record of every on-chain
movement; these tables say what each movement covers, so nothing is paid or anchored twice:

* ``chain_payout_items`` — receipt → the ``post_payouts`` transfer of the epoch that pays
  it (a receipt is in at most one: it is the primary key). Written when the epoch is
  *planned*.
* ``chain_payout_epochs`` / ``chain_payout_leaves`` — each epoch's Merkle root of
  ``(index, node, amount)`` leaves, kept so the market (or the node) can prove a claim.
* ``chain_verdicts`` — verifiers' signatures on a slash verdict, gathered until the
  program's quorum is reached (migration ``0009_program``).
* ``chain_anchor_items`` — receipt → the anchor transfer whose Merkle tree holds it;
  ``receipts.anchor_id`` and the ``anchors`` row are written once that lands.
* ``chain_deposits`` — every deposit seen on chain, keyed by transaction signature,
  ``credited`` to the account its memo names or ``unclaimed`` (never lost).
* ``chain_allowances`` — buyer accounts funded by an SPL ``approve`` to the market.
  ``credited`` is the part of the account's balance that stands for the live on-chain
  allowance (see ``market.onchain.allowance``).
* ``chain_cursors`` — scan positions (e.g. the newest deposit signature examined).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from market.models import Base, utcnow


class ChainPayoutItem(Base):
    __tablename__ = "chain_payout_items"

    receipt_id: Mapped[str] = mapped_column(ForeignKey("receipts.id"), primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("chain_transfers.id"), index=True)


class ChainAnchorItem(Base):
    __tablename__ = "chain_anchor_items"

    receipt_id: Mapped[str] = mapped_column(ForeignKey("receipts.id"), primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("chain_transfers.id"), index=True)


class ChainDeposit(Base):
    __tablename__ = "chain_deposits"

    signature: Mapped[str] = mapped_column(String(128), primary_key=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("chain_transfers.id"))
    account_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"), nullable=True)
    memo: Mapped[str | None] = mapped_column(Text, nullable=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    source_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    slot: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)  # credited | unclaimed
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    credited_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ChainAllowance(Base):
    __tablename__ = "chain_allowances"
    # one wallet funds one account
    __table_args__ = (UniqueConstraint("wallet", name="uq_chain_allowances_wallet"),)

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    wallet: Mapped[str] = mapped_column(String(64))
    credited: Mapped[int] = mapped_column(BigInteger, default=0)
    delegated: Mapped[int] = mapped_column(BigInteger, default=0)  # last seen on chain
    token_balance: Mapped[int] = mapped_column(BigInteger, default=0)  # last seen on chain
    active: Mapped[bool] = mapped_column(Boolean, default=False)  # market is the delegate
    pulls: Mapped[int] = mapped_column(Integer, default=0)  # pull counter (idempotency keys)
    # owed charges the allowance no longer covers (revoked before the pull): repaid first
    # from the next approval, never written off
    shortfall: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # the wallet's signed registration (unix seconds): a replayed or older one is refused
    signed_at: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    refreshed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChainCursor(Base):
    __tablename__ = "chain_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str | None] = mapped_column(String(128), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ChainPayoutEpoch(Base):
    """One ``post_payouts``; the program's epoch number is the id of its transfer row."""

    __tablename__ = "chain_payout_epochs"

    epoch: Mapped[int] = mapped_column(ForeignKey("chain_transfers.id"), primary_key=True,
                                       autoincrement=False)
    root: Mapped[str] = mapped_column(String(64))
    total: Mapped[int] = mapped_column(BigInteger)
    leaf_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChainPayoutLeaf(Base):
    """A node's leaf in an epoch; its claim is the ``claim:<epoch>:<index>`` transfer."""

    __tablename__ = "chain_payout_leaves"

    epoch: Mapped[int] = mapped_column(ForeignKey("chain_payout_epochs.epoch"), primary_key=True)
    leaf_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(64), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)


class ChainVerdict(Base):
    """One verifier's signature on a receipt's slash verdict (the exact fields signed)."""

    __tablename__ = "chain_verdicts"
    __table_args__ = (UniqueConstraint("receipt_id", "verifier",
                                       name="uq_chain_verdicts_receipt_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    receipt_id: Mapped[str] = mapped_column(ForeignKey("receipts.id"), index=True)
    verifier: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    refund: Mapped[int] = mapped_column(BigInteger)
    refund_account: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[int] = mapped_column(BigInteger)
    signature: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
