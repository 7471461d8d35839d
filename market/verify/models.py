"""The verification worker's own table: one row per receipt once sampling decided.

``verification_tasks`` keeps the verifier's bookkeeping out of the market's
``receipts`` table: whether the receipt was sampled (and at what rate), why it is
verified (``first_jobs`` / ``sampled`` / ``challenge``), how many attempts ran and
the outcome. The challenge state itself (pending/verifying/settled/slashed/escalated) and
the evidence stay on ``receipts``, where the buyer API and explorer read them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from market.models import Base, utcnow


class VerificationTask(Base):
    __tablename__ = "verification_tasks"
    __table_args__ = (Index("ix_verification_tasks_todo", "verify", "outcome"),)

    receipt_id: Mapped[str] = mapped_column(
        ForeignKey("receipts.id", ondelete="CASCADE"), primary_key=True
    )
    # True: re-execute before settling. False: settle at window close unless challenged.
    verify: Mapped[bool] = mapped_column(Boolean, default=False)
    sample_rate: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str] = mapped_column(String(16))  # first_jobs | sampled | challenge | skipped
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # None until verified; then honest | fraud | unavailable
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # after a verifier could not judge it: not dispatched again before this (backoff)
    not_before: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
