"""Exactly-once on-chain movements: the ``chain_transfers`` state machine.

Every movement the market makes is a ``chain_transfers`` row, planned in the same
database transaction as whatever it settles (a payout round marks its receipts paid, an
anchor reserves its receipts). Then :func:`drive` moves rows along::

    planned ──prepare+commit──▶ sent(signature, blockhash, last_valid_block_height)
    sent ──status()──▶ confirmed        (handler's on_confirm runs in that same commit)
                   └─▶ expired / failed ──▶ re-sent with a new blockhash (same row, key, memo)

``sent`` is committed *before* the transaction is broadcast: a signed transaction's
signature is known before it leaves (``Ledger.prepare``). After a crash anywhere, the next
``drive`` asks the chain about each ``sent`` row: landed → ``confirmed``; unknown but its
blockhash still valid → the same bytes are rebuilt and re-broadcast (a duplicate is
harmless: one signature lands at most once); unknown and expired → it can never land, so
it is re-planned. Hence never twice, never lost.

The instructions of a row are rebuilt from the row (its kind, amount, memo and the
database) by the handler registered for its kind, so a row needs no pickled transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from market.chain.runtime import ChainRuntime
from market.models import ChainTransfer, utcnow
from programs.ledger import PreparedTx, TransactionRejected, TxState, TxStatus

log = logging.getLogger("market.chain")

#: rows that still have to reach ``confirmed``
ACTIVE = ("planned", "sent", "expired", "failed")
RESENDABLE = ("planned", "expired", "failed")

#: test seam: called with ("sent" | "submitted", row ids) at the two crash points
fault_hook: Callable[[str, list[int]], None] | None = None


@dataclass(frozen=True)
class Handler:
    """How to (re)build a row's transaction and what confirming it means in the DB."""

    build: Callable[[ChainRuntime, Session, ChainTransfer], tuple[list[Instruction], list[Keypair]]]
    on_confirm: Callable[[ChainRuntime, Session, ChainTransfer, TxStatus], None] | None = None


HANDLERS: dict[str, Handler] = {}


def register(kind: str, handler: Handler) -> None:
    HANDLERS[kind] = handler


def _handler(kind: str) -> Handler:
    if not HANDLERS:
        import market.chain.allowance  # noqa: F401  (registers "pull")
        import market.chain.settle  # noqa: F401  (registers payout, fee, slash, anchor)
    try:
        return HANDLERS[kind]
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


def _load(sessions: sessionmaker[Session], ids: Sequence[int]) -> list[ChainTransfer]:
    with sessions() as session:
        rows = session.execute(
            select(ChainTransfer).where(ChainTransfer.id.in_(list(ids))).order_by(ChainTransfer.id)
        ).scalars().all()
        session.expunge_all()
        return list(rows)


async def _prepare(
    rt: ChainRuntime,
    sessions: sessionmaker[Session],
    row: ChainTransfer,
    *,
    blockhash: Hash | None = None,
    last_valid_block_height: int | None = None,
) -> PreparedTx:
    with sessions() as session:
        instructions, signers = _handler(row.kind).build(rt, session, row)
    return await rt.ledger.prepare(
        instructions,
        rt.market,
        signers,
        blockhash=blockhash,
        last_valid_block_height=last_valid_block_height,
    )


def _finish(
    rt: ChainRuntime, sessions: sessionmaker[Session], row: ChainTransfer, st: TxStatus
) -> str:
    """Record the chain's verdict on a sent row (guarded by its signature)."""
    with sessions.begin() as session:
        if st.state is TxState.CONFIRMED:
            done = session.execute(
                update(ChainTransfer)
                .where(
                    ChainTransfer.id == row.id,
                    ChainTransfer.state == "sent",
                    ChainTransfer.signature == row.signature,
                )
                .values(state="confirmed", updated_at=utcnow())
            ).rowcount
            if done == 1:
                handler = _handler(row.kind)
                if handler.on_confirm is not None:
                    handler.on_confirm(rt, session, row, st)
                return "confirmed"
            return "raced"
        if st.state in (TxState.EXPIRED, TxState.FAILED):
            new_state = "expired" if st.state is TxState.EXPIRED else "failed"
            if st.state is TxState.FAILED:
                log.warning("chain transfer %s (%s) landed with error %s; will re-send",
                            row.idempotency_key, row.signature, st.err)
            session.execute(
                update(ChainTransfer)
                .where(
                    ChainTransfer.id == row.id,
                    ChainTransfer.state == "sent",
                    ChainTransfer.signature == row.signature,
                )
                .values(state=new_state, updated_at=utcnow())
            )
            return new_state
    return "sent"


@dataclass
class DriveResult:
    confirmed: int = 0
    sent: int = 0  # still in flight (sent, not yet confirmed)
    retry: int = 0  # rejected at preflight / expired / failed: re-sent next time
    errors: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"confirmed": self.confirmed, "in_flight": self.sent, "retry": self.retry,
                "errors": self.errors or []}


async def drive(
    rt: ChainRuntime,
    sessions: sessionmaker[Session],
    ids: Sequence[int],
    *,
    timeout: float | None = None,
) -> DriveResult:
    """Move the given rows towards ``confirmed``; safe to call again at any time."""
    result = DriveResult(errors=[])
    timeout = rt.settings.chain_confirm_timeout_s if timeout is None else timeout
    waiting: list[ChainTransfer] = []
    resend: list[ChainTransfer] = []

    # 1. resolve rows a previous run sent (maybe before crashing)
    for row in _load(sessions, ids):
        if row.state == "sent":
            st = await rt.ledger.status(row.signature or "", int(row.last_valid_block_height or 0))
            if st.state is TxState.PENDING:
                # still able to land: re-broadcast the very same bytes, never new ones
                prepared = await _prepare(
                    rt, sessions, row, blockhash=Hash.from_string(row.blockhash or ""),
                    last_valid_block_height=row.last_valid_block_height,
                )
                if prepared.signature == row.signature:
                    try:
                        await rt.ledger.submit(prepared)
                    except Exception as exc:  # noqa: BLE001 - it may have landed already
                        log.info("re-broadcast of %s: %s", row.signature, exc)
                waiting.append(row)
                continue
            outcome = _finish(rt, sessions, row, st)
            if outcome == "confirmed":
                result.confirmed += 1
            elif outcome in ("expired", "failed"):
                row.state = outcome
                resend.append(row)
        elif row.state in RESENDABLE:
            resend.append(row)

    # 2. sign every row to (re)send, then record them all as sent in one commit
    prepared_rows: list[tuple[ChainTransfer, PreparedTx]] = []
    for row in resend:
        try:
            prepared_rows.append((row, await _prepare(rt, sessions, row)))
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the others
            log.exception("cannot build chain transfer %s", row.idempotency_key)
            result.errors.append(f"{row.idempotency_key}: {exc}")
    to_submit: list[tuple[ChainTransfer, PreparedTx]] = []
    if prepared_rows:
        with sessions.begin() as session:
            for row, prepared in prepared_rows:
                done = session.execute(
                    update(ChainTransfer)
                    .where(ChainTransfer.id == row.id, ChainTransfer.state == row.state)
                    .values(
                        state="sent",
                        signature=prepared.signature,
                        blockhash=prepared.blockhash,
                        last_valid_block_height=prepared.last_valid_block_height,
                        updated_at=utcnow(),
                    )
                ).rowcount
                if done == 1:
                    to_submit.append((row, prepared))
    if fault_hook is not None and to_submit:
        fault_hook("sent", [row.id for row, _ in to_submit])

    # 3. broadcast
    for row, prepared in to_submit:
        row.state, row.signature = "sent", prepared.signature
        row.blockhash = prepared.blockhash
        row.last_valid_block_height = prepared.last_valid_block_height
        try:
            await rt.ledger.submit(prepared)
        except TransactionRejected as exc:
            # Preflight refused it: it was not broadcast and can never land. Back to planned.
            log.warning("chain transfer %s rejected: %s", row.idempotency_key, exc)
            result.errors.append(f"{row.idempotency_key}: {exc}")
            with sessions.begin() as session:
                session.execute(
                    update(ChainTransfer)
                    .where(ChainTransfer.id == row.id, ChainTransfer.state == "sent",
                           ChainTransfer.signature == prepared.signature)
                    .values(state="planned", signature=None, blockhash=None,
                            last_valid_block_height=None, updated_at=utcnow())
                )
            result.retry += 1
            continue
        except Exception as exc:  # noqa: BLE001 - unknown: status() will tell later
            log.warning("broadcast of %s failed: %s", row.idempotency_key, exc)
        waiting.append(row)
    if fault_hook is not None and to_submit:
        fault_hook("submitted", [row.id for row, _ in to_submit])

    # 4. wait for the chain's verdict
    for row in waiting:
        st = await rt.ledger.confirm(
            row.signature or "", int(row.last_valid_block_height or 0), timeout=timeout
        )
        outcome = _finish(rt, sessions, row, st)
        if outcome == "confirmed":
            result.confirmed += 1
        elif outcome == "sent":
            result.sent += 1
        elif outcome != "raced":
            result.retry += 1
    return result
