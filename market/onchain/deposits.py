"""Prepaid deposits: AIDP sent to the market's deposit account with a memo naming the
buyer's account (``aidp:deposit:v1:<account id>``, or just the account id).

The watcher credits each deposit exactly once, keyed by its transaction signature: a
``chain_deposits`` row (primary key = signature), a ``chain_transfers`` row of kind
``deposit`` (state ``confirmed``) and, when the memo names a known account, the journal
entry ``deposit:<signature>`` that raises the balance. A memo naming no known account
leaves the deposit ``unclaimed`` — recorded, never lost — until :func:`claim` assigns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp
from market.models import Account, utcnow
from market.money import billing
from market.onchain import transfers
from market.onchain.models import ChainCursor, ChainDeposit
from market.onchain.runtime import ChainRuntime

CURSOR = "deposits"


@dataclass
class ScanResult:
    seen: int = 0
    credited: list[str] = field(default_factory=list)  # signatures
    unclaimed: list[str] = field(default_factory=list)
    cursor: str | None = None


def get_cursor(session: Session, name: str) -> str | None:
    row = session.get(ChainCursor, name)
    return row.value if row else None


def set_cursor(session: Session, name: str, value: str | None) -> None:
    row = session.get(ChainCursor, name)
    if row is None:
        session.add(ChainCursor(name=name, value=value, updated_at=utcnow()))
    else:
        row.value = value
        row.updated_at = utcnow()


def record_deposit(session: Session, rt: ChainRuntime, dep: aidp.Deposit) -> str | None:
    """Record one scanned deposit; returns 'credited' / 'unclaimed', None if already seen."""
    if session.get(ChainDeposit, dep.signature) is not None:
        return None
    row = transfers.plan(
        session, kind="deposit", key=f"deposit:{dep.signature}", amount=dep.amount,
        from_address=dep.source_account, to_address=rt.cfg.deposit, memo=dep.memo,
        state="confirmed", signature=dep.signature,
    )
    account_id = dep.account if dep.account and session.get(Account, dep.account) else None
    status = "unclaimed"
    if account_id is not None:
        billing.credit_account(session, account_id, dep.amount, dep.signature, kind="deposit")
        status = "credited"
    session.add(ChainDeposit(
        signature=dep.signature, transfer_id=row.id, account_id=account_id, memo=dep.memo,
        amount=dep.amount, source_owner=dep.source_owner, slot=dep.slot, status=status,
        credited_at=utcnow() if account_id else None,
    ))
    session.flush()
    return status


async def scan(rt: ChainRuntime, sessions: sessionmaker[Session], *,
               from_start: bool = False) -> ScanResult:
    """Scan the deposit account since the saved cursor (or from the start) and credit."""
    with sessions() as session:
        since = None if from_start else get_cursor(session, CURSOR)
    found = await aidp.scan_deposits(rt.ledger, rt.cfg, since=since)
    result = ScanResult(seen=len(found.deposits), cursor=found.cursor)
    with sessions.begin() as session:
        for dep in found.deposits:
            status = record_deposit(session, rt, dep)
            if status == "credited":
                result.credited.append(dep.signature)
            elif status == "unclaimed":
                result.unclaimed.append(dep.signature)
        if found.cursor != since:
            set_cursor(session, CURSOR, found.cursor)
    return result


def claim(session: Session, signature: str, account_id: str) -> bool:
    """Credit an unclaimed deposit to ``account_id`` (an operator's decision). Once."""
    dep = session.execute(
        select(ChainDeposit).where(ChainDeposit.signature == signature).with_for_update()
    ).scalar_one_or_none()
    if dep is None:
        raise LookupError(f"no deposit {signature}")
    if dep.status != "unclaimed":
        return False
    billing.credit_account(session, account_id, dep.amount, signature, kind="deposit")
    dep.status, dep.account_id, dep.credited_at = "credited", account_id, utcnow()
    return True
