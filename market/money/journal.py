"""Buyer balances and holds checked against the money journal, to the base unit.

Every movement of a buyer's funds writes a ``ledger_entries`` row, so the journal alone
says what each account must hold:

    balance = credits + deposits + refunds + allowance changes − charges
    held    = holds − releases

and no job may have been charged more than its hold. ``aidp-market chain reconcile``
prints these lines beside the chain's, and fails on any difference.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from market.models import Account, Job, LedgerEntry

BALANCE_SIGNS = {"credit": 1, "deposit": 1, "refund": 1, "allowance": 1, "charge": -1}
HELD_SIGNS = {"hold": 1, "release": -1}


class Balanced(abc.ABC):
    """A reconciliation line: two views of one amount that must agree to the base unit.

    Both the journal audit and the chain reconcile print such lines and fail on any
    that is not ``ok``; each says how its own ``diff`` is taken."""

    @property
    @abc.abstractmethod
    def diff(self) -> int: ...

    @property
    def ok(self) -> bool:
        return self.diff == 0


@dataclass(frozen=True)
class AuditLine(Balanced):
    item: str
    subject: str
    db: int  # what the tables hold
    journal: int  # what the journal says they must hold

    @property
    def diff(self) -> int:
        return self.db - self.journal


def _sums(session: Session, signs: dict[str, int]) -> dict[str, int]:
    rows = session.execute(
        select(LedgerEntry.account_id, LedgerEntry.kind, func.sum(LedgerEntry.amount))
        .where(LedgerEntry.kind.in_(list(signs)), LedgerEntry.account_id.is_not(None))
        .group_by(LedgerEntry.account_id, LedgerEntry.kind)
    ).all()
    out: dict[str, int] = {}
    for account_id, kind, total in rows:
        out[account_id] = out.get(account_id, 0) + signs[kind] * int(total or 0)
    return out


def audit(session: Session) -> list[AuditLine]:
    """One balance and one held line per account that differs or has money, then one line
    counting jobs charged beyond their hold (0 expected)."""
    balances, held = _sums(session, BALANCE_SIGNS), _sums(session, HELD_SIGNS)
    lines: list[AuditLine] = []
    for account_id, balance, holding in session.execute(
            select(Account.id, Account.balance, Account.held).order_by(Account.id)):
        expected_balance = balances.get(account_id, 0)
        expected_held = held.get(account_id, 0)
        if balance or expected_balance:
            lines.append(AuditLine("balance", account_id, int(balance), expected_balance))
        if holding or expected_held:
            lines.append(AuditLine("held", account_id, int(holding), expected_held))
    over = session.execute(
        select(func.count()).select_from(Job).where(Job.charged_amount > Job.hold_amount)
    ).scalar_one()
    charge = (select(LedgerEntry.job_id, LedgerEntry.amount)
              .where(LedgerEntry.kind == "charge").subquery())
    mismatched = session.execute(
        select(func.count()).select_from(Job)
        .outerjoin(charge, charge.c.job_id == Job.id)
        .where(Job.status != "running",
               func.coalesce(charge.c.amount, 0) != func.coalesce(Job.charged_amount, 0))
    ).scalar_one()
    lines.append(AuditLine("jobs charged beyond their hold", "all jobs", int(over), 0))
    lines.append(AuditLine("job charges not in the journal", "all jobs", mismatched, 0))
    return lines
