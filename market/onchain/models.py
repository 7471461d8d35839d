"""The chain layer's own tables (migration ``0003_chain``).

``chain_transfers`` (in ``market.models``) is the exactly-once record of every on-chain
movement; these tables say what each movement covers, so nothing is paid or anchored twice:

* ``chain_payout_items`` — receipt → the payout transfer that pays it (a receipt is in
  at most one: it is the primary key). Written when the round is *planned*.
* ``chain_anchor_items`` — receipt → the anchor transfer whose Merkle tree holds it;
  ``receipts.anchor_id`` and the ``anchors`` row are written once that lands.
* ``chain_deposits`` — every deposit seen on chain, keyed by transaction signature,
  ``credited`` to the account its memo names or ``unclaimed`` (never lost).
* ``chain_allowances`` — buyer accounts funded by an SPL ``approve`` to the market.
  ``credited`` is the part of the account's balance that stands for the live on-chain
  allowance (see ``market.onchain.allowance``).
* ``chain_cursors`` — scan positions (e.g. the newest deposit signature examined).
* ``unbonding_requests`` — node operators' signed unbond requests (``market.onchain.unbonding``).
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


class UnbondingRequest(Base):
    """A node operator's signed request to take ``amount`` of its stake back (migration
    ``0004_unbonding``). The market co-signs the withdrawal only once ``available_at``
    (``requested_at`` + ``settings.chain.unbonding_period_s``) has passed; ``transfer_key`` is
    the ``chain_transfers`` row that moves it. Unique per (node, requested_at): a replayed
    request inserts nothing."""

    __tablename__ = "unbonding_requests"
    __table_args__ = (UniqueConstraint("node_id", "requested_at",
                                       name="uq_unbonding_requests_node_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    requested_at: Mapped[int] = mapped_column(BigInteger)  # unix seconds, as signed
    available_at: Mapped[datetime] = mapped_column()
    state: Mapped[str] = mapped_column(String(16), default="requested")  # |withdrawn|cancelled
    transfer_key: Mapped[str | None] = mapped_column(String(160), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
