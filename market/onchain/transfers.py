"""Exactly-once on-chain movements: the ``chain_transfers`` state machine.

Every movement the market makes is a ``chain_transfers`` row, planned in the same
database transaction as whatever it settles (a payout round marks its receipts paid, an
anchor reserves its receipts). Then :func:`drive` moves rows along::

    planned ──prepare+commit──▶ sent(signature, blockhash, last_valid_block_height)
    sent ──status()──▶ confirmed        (handler's on_confirm runs in that same commit)
                   └─▶ expired / failed ──▶ re-sent with a new blockhash (same row, key, memo)
    sent ──preflight rejected──▶ sent (kept: the same bytes may still be broadcast by
                                       another worker; re-planned once expired)

(``failed``: landed with an error, only the fee moved. Unsent pulls the buyer's allowance
no longer covers become ``cancelled``; see ``market.onchain.allowance``.)

``sent`` is committed *before* the transaction is broadcast: a signed transaction's
signature is known before it leaves (``Ledger.prepare``). After a crash anywhere, the next
``drive`` asks the chain about each ``sent`` row: landed → ``confirmed``; unknown but its
blockhash still valid → the same bytes are rebuilt and re-broadcast (a duplicate is
harmless: one signature lands at most once); unknown and expired → it can never land, so
it is re-planned. Hence never twice, never lost.

The chain side of that loop is ``chain.ledger.base.Ledger.drive``; this module keeps the
rows. The instructions of a row are rebuilt from the row (its kind, amount, memo and the
database) by the handler registered for its kind, so a row needs no stored transaction,
and a rebuilt ``sent`` transaction reproduces the recorded signature.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from solders.instruction import Instruction
from solders.keypair import Keypair
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from chain.ledger.base import LedgerError, PreparedTx, TransactionRejected, TxState, TxStatus
from market.models import ChainTransfer, utcnow
from market.onchain.runtime import ChainRuntime

log = logging.getLogger("market.onchain")

#: rows that still have to reach ``confirmed``
ACTIVE = ("planned", "sent", "expired", "failed")
RESENDABLE = ("planned", "expired", "failed")

#: test seam: called with ("sent" | "landed", row id) at the two crash points — right
#: after the ``sent`` row commits, and after the chain's verdict before it is recorded
fault_hook: Callable[[str, int], None] | None = None


@dataclass(frozen=True)
class Handler:
    """How to (re)build a row's transaction and what confirming it means in the DB."""

    build: Callable[[ChainRuntime, Session, ChainTransfer], tuple[list[Instruction], list[Keypair]]]
    on_confirm: Callable[[ChainRuntime, Session, ChainTransfer, TxStatus], None] | None = None


#: kind -> its handler; each kind's module exports its own table, ``market.onchain.handlers``
#: joins them, and the driver is given the table (it imports none of those modules)
Handlers = Mapping[str, Handler]


def _handler(handlers: Handlers, kind: str) -> Handler:
    try:
        return handlers[kind]
    except KeyError:
        raise LookupError(f"no chain transfer handler for kind {kind!r}") from None


def plan(
    session: Session,
    *,
    kind: str,
    key: str,
    amount: int,
    from_address: str | None,
    to_address: str | None,
    memo: str | None,
    state: str = "planned",
    signature: str | None = None,
) -> ChainTransfer:
    """Insert the row for ``key`` (or return the existing one: replays are no-ops)."""
    existing = session.execute(
        select(ChainTransfer).where(ChainTransfer.idempotency_key == key)
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    row = ChainTransfer(
        kind=kind,
        idempotency_key=key,
        amount=amount,
        from_address=from_address,
        to_address=to_address,
        memo=memo,
        state=state,
        signature=signature,
    )
    session.add(row)
    session.flush()
    return row


def active_ids(session: Session, kinds: Iterable[str]) -> list[int]:
    return list(
        session.execute(
            select(ChainTransfer.id)
            .where(ChainTransfer.state.in_(ACTIVE), ChainTransfer.kind.in_(list(kinds)))
            .order_by(ChainTransfer.id)
        ).scalars()
    )


class _Raced(Exception):
    """Another worker moved the row first: this one sends nothing."""


def confirm_elsewhere(session: Session, row: ChainTransfer,
                      states: Sequence[str] = RESENDABLE) -> bool:
    """Mark a row ``confirmed`` because its effect is already on chain, made by another
    submitter (a node claiming its own payout). By default only a row that is not
    ``sent``: one of ours in flight is resolved by its own signature, unless the chain
    itself records the effect once whoever sent it (a claim bitmap), when the caller may
    pass ``ACTIVE``. False when the row moved first."""
    return session.execute(
        update(ChainTransfer)
        .where(ChainTransfer.id == row.id, ChainTransfer.state.in_(list(states)))
        .values(state="confirmed", updated_at=utcnow())
    ).rowcount == 1


def _load(sessions: sessionmaker[Session], ids: Sequence[int]) -> list[ChainTransfer]:
    with sessions() as session:
        rows = session.execute(
            select(ChainTransfer).where(ChainTransfer.id.in_(list(ids))).order_by(ChainTransfer.id)
        ).scalars().all()
        session.expunge_all()
        return list(rows)


def record_verdict(
    rt: ChainRuntime, sessions: sessionmaker[Session], row: ChainTransfer, st: TxStatus,
    handlers: Handlers,
) -> str:
    """Record the chain's verdict on a sent row (guarded by its signature)."""
    if st.state is TxState.PENDING:
        return "sent"
    guard = (
        ChainTransfer.id == row.id,
        ChainTransfer.state == "sent",
        ChainTransfer.signature == row.signature,
    )
    with sessions.begin() as session:
        if st.state is TxState.CONFIRMED:
            if session.execute(
                update(ChainTransfer).where(*guard).values(state="confirmed", updated_at=utcnow())
            ).rowcount != 1:
                return "raced"
            handler = _handler(handlers, row.kind)
            if handler.on_confirm is not None:
                handler.on_confirm(rt, session, row, st)
            return "confirmed"
        if st.state is TxState.FAILED:
            log.warning("chain transfer %s (%s) landed with error %s; it will be re-sent",
                        row.idempotency_key, row.signature, st.err)
        new_state = "failed" if st.state is TxState.FAILED else "expired"
        session.execute(update(ChainTransfer).where(*guard)
                        .values(state=new_state, updated_at=utcnow()))
        return new_state


async def drive_one(rt: ChainRuntime, sessions: sessionmaker[Session], row: ChainTransfer,
                    handlers: Handlers, *, timeout: float) -> str:
    """One row one step further: 'confirmed', 'sent' (in flight), 'expired'/'failed'
    (re-sent next time), 'rejected' (refused by preflight; re-planned once expired),
    'raced' or 'error'."""
    if row.state == "confirmed":
        return "confirmed"
    sent = None
    if row.state == "sent":
        sent = PreparedTx(row.signature or "", row.blockhash or "",
                          int(row.last_valid_block_height or 0), b"")
    with sessions() as session:
        instructions, signers = _handler(handlers, row.kind).build(rt, session, row)

    def mark_sent(prepared: PreparedTx) -> None:
        with sessions.begin() as session:
            if session.execute(
                update(ChainTransfer)
                .where(ChainTransfer.id == row.id, ChainTransfer.state == row.state,
                       ChainTransfer.signature.is_(None) if row.signature is None
                       else ChainTransfer.signature == row.signature)
                .values(state="sent", signature=prepared.signature,
                        blockhash=prepared.blockhash,
                        last_valid_block_height=prepared.last_valid_block_height,
                        updated_at=utcnow())
            ).rowcount != 1:
                raise _Raced
        row.state, row.signature = "sent", prepared.signature
        row.blockhash = prepared.blockhash
        row.last_valid_block_height = prepared.last_valid_block_height
        if fault_hook is not None:
            fault_hook("sent", row.id)

    try:
        st = await rt.ledger.drive(instructions, rt.market, signers, sent=sent,
                                   mark_sent=mark_sent, timeout=timeout)
    except _Raced:
        return "raced"
    except TransactionRejected as exc:
        # Preflight refused it, so this broadcast did not happen. The row stays ``sent`` with
        # its signature all the same: another worker that read the row as ``sent`` may
        # re-broadcast these very bytes, and once the refusal's cause is gone (funds
        # arrived, a lagging RPC node caught up) they land. Forgetting the signature here
        # would then re-plan a second payment; keeping it, the landing is seen and
        # recorded, and only an expired blockhash lets the row be planned again.
        log.warning("chain transfer %s rejected: %s", row.idempotency_key, exc)
        return "rejected"
    except LedgerError as exc:
        log.error("chain transfer %s: %s", row.idempotency_key, exc)
        return "error"
    if fault_hook is not None:
        fault_hook("landed", row.id)
    return record_verdict(rt, sessions, row, st, handlers)


@dataclass
class DriveResult:
    counts: dict[str, int]

    @property
    def confirmed(self) -> int:
        return self.counts.get("confirmed", 0)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.counts)


async def drive(
    rt: ChainRuntime,
    sessions: sessionmaker[Session],
    ids: Sequence[int],
    handlers: Handlers,
    *,
    timeout: float | None = None,
) -> DriveResult:
    """Move the given rows towards ``confirmed``; safe to call again at any time, from
    any process. A row that fails to build or send is logged and left for the next run."""
    timeout = rt.settings.chain.confirm_timeout_s if timeout is None else timeout
    counts: dict[str, int] = {}
    for row in _load(sessions, ids):
        try:
            outcome = await drive_one(rt, sessions, row, handlers, timeout=timeout)
        except Exception:  # noqa: BLE001 - one bad row must not stop the others
            log.exception("chain transfer %s", row.idempotency_key)
            outcome = "error"
        counts[outcome] = counts.get(outcome, 0) + 1
    return DriveResult(counts)
