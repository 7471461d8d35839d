"""Stake unbonding: the market's policy before it co-signs a withdrawal of node stake.

A node's stake account is owned by the 2-of-3 SPL multisig {operator, market, arbiter}
(``chain.aidp.stake_for``). The chain lets any two members move it; the
market adds the *when*: it co-signs a withdrawal only after ``settings.chain.unbonding_period_s``
has passed since the operator asked to unbond, and only once every slash of that node has
landed. Neither side can move stake alone: the market never holds the operator's key, and
the operator needs the market's (or the arbiter's) signature.

Flow (nodes have no API key: every call is authenticated by the operator's own keypair)::

    1. POST /v1/stake/unbond    {pubkey, amount, requested_at, signature}
         signature = sign(operator, UNBOND_DOMAIN, canonical_json({pubkey, amount,
         requested_at})); requested_at within MAX_SKEW_S of the market's clock; unique per
         (node, requested_at), so a replay inserts nothing; amount ≤ stake on chain minus
         slashes not landed yet minus earlier open requests.
         → unbonding_requests row (state "requested", available_at = requested_at + period)
       The node keeps serving and being routed meanwhile: it is still staked, and its
       slashes still come out of that stake first.
    2. POST /v1/stake/withdraw  {pubkey, issued_at, signature}      (WITHDRAW_DOMAIN)
         the market checks the policy (oldest open request past available_at, no slash of
         the node still on its way), plans — or reuses — the ``withdraw`` row of
         ``chain_transfers`` (key ``withdraw:unbond-<id>``) for min(requested, stake left),
         stores a fresh blockhash on it and returns the transaction *message* to sign:
         transfer stake → operator's AIDP account, fee payer market, signers
         [market, operator], memo ``aidp:withdraw:v1:unbond-<id>``.
    3. POST /v1/stake/withdraw/submit  {pubkey, request_id, blockhash, tx_signature}
         tx_signature is the operator's Solana signature of exactly that message (which
         authenticates the call). The market rebuilds the message from the row, checks
         the signature and the policy again, adds its own, records the row ``sent``
         (guarded: one submission wins) *before* broadcasting, then waits for the verdict:
         confirmed → request ``withdrawn``; expired/failed → step 2 again gives a new
         message for the same row and key.

``aidp-node withdraw`` runs steps 2 and 3. A ``withdraw`` row cannot be re-signed by
the market alone, so ``market.onchain.transfers.drive`` never sends one (its builder
refuses); a ``sent`` one is resolved by asking the chain about its signature
(:func:`resolve`), and the same key is never paid twice.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp
from chain.ledger.base import PreparedTx, TransactionRejected, TxState, TxStatus
from market.errors import BadRequest, Conflict, Forbidden, NotFound
from market.models import ChainTransfer, Node, Receipt, utcnow
from market.onchain import transfers
from market.onchain.models import UnbondingRequest
from market.onchain.runtime import ChainRuntime
from market.onchain.stake import unsettled_slashes
from protocol.canonical import canonical_json
from protocol.keys import UNBOND_DOMAIN, WITHDRAW_DOMAIN, verify

log = logging.getLogger("market.onchain.unbonding")

#: how far a signed request's timestamp may be from the market's clock
MAX_SKEW_S = 300
#: receipt states that may still end in a slash
OPEN_RECEIPT_STATES = ("pending", "verifying", "escalated")


# ---- signed requests (what the operator signs) -----------------------------------------


def unbond_message(pubkey: str, amount: int, requested_at: int) -> bytes:
    return canonical_json({"pubkey": pubkey, "amount": int(amount),
                           "requested_at": int(requested_at)})


def withdraw_message(pubkey: str, issued_at: int) -> bytes:
    return canonical_json({"pubkey": pubkey, "issued_at": int(issued_at)})


def _check_signed(pubkey: str, domain: bytes, message: bytes, signature: str,
                  stamp: int, now: float) -> None:
    if not verify(pubkey, domain, message, signature):
        raise Forbidden("Signature does not verify for this pubkey and body.",
                        param="signature", code="invalid_signature")
    if abs(now - stamp) > MAX_SKEW_S:
        raise BadRequest(f"Timestamp is more than {MAX_SKEW_S}s from the market's clock.",
                         param="requested_at" if domain == UNBOND_DOMAIN else "issued_at",
                         code="stale_request")


def _node(session: Session, pubkey: str) -> Node:
    node = session.execute(select(Node).where(Node.pubkey == pubkey)).scalar_one_or_none()
    if node is None:
        raise NotFound(f"No node with pubkey {pubkey!r}.", param="pubkey", code="unknown_node")
    return node


def _pending_slash(session: Session, node_id: str) -> int:
    return unsettled_slashes(session).get(node_id, 0)


# ---- step 1: unbond ------------------------------------------------------------------------


def _view(req: UnbondingRequest) -> dict[str, Any]:
    return {"id": req.id, "node_id": req.node_id, "amount": req.amount,
            "requested_at": req.requested_at, "available_at": req.available_at.isoformat(),
            "state": req.state, "transfer_key": req.transfer_key}


async def request_unbond(rt: ChainRuntime, sessions: sessionmaker[Session], *, pubkey: str,
                         amount: int, requested_at: int, signature: str,
                         now: float | None = None) -> dict[str, Any]:
    """Record a signed unbond request (step 1); refuses bad signatures, stale timestamps,
    replays and more than the stake can cover."""
    now = time.time() if now is None else now
    if amount <= 0:
        raise BadRequest("amount must be a positive number of base units.", param="amount")
    _check_signed(pubkey, UNBOND_DOMAIN, unbond_message(pubkey, amount, requested_at),
                  signature, requested_at, now)
    with sessions() as session:
        node = _node(session, pubkey)
        node_id = node.id
    on_chain = await rt.ledger.token_balance(rt.stake_of(pubkey).account_pk)
    period = timedelta(seconds=rt.settings.chain.unbonding_period_s)
    try:
        with sessions.begin() as session:
            if session.execute(select(UnbondingRequest.id).where(
                    UnbondingRequest.node_id == node_id,
                    UnbondingRequest.requested_at == requested_at)).first():
                raise Conflict("This unbond request was already received.",
                               param="requested_at", code="replayed_request")
            open_amount = int(session.execute(
                select(func.coalesce(func.sum(UnbondingRequest.amount), 0)).where(
                    UnbondingRequest.node_id == node_id, UnbondingRequest.state == "requested")
            ).scalar_one())
            free = on_chain - _pending_slash(session, node_id) - open_amount
            if amount > free:
                raise Conflict(f"Only {max(free, 0)} base units of stake can be unbonded.",
                               param="amount", code="insufficient_stake")
            start = datetime.fromtimestamp(requested_at, tz=UTC)
            req = UnbondingRequest(node_id=node_id, amount=amount, requested_at=requested_at,
                                   available_at=start + period, state="requested")
            session.add(req)
            session.flush()
            out = _view(req)
    except IntegrityError:  # the same request raced in on another connection
        raise Conflict("This unbond request was already received.", param="requested_at",
                       code="replayed_request") from None
    log.info("unbond requested", extra={"node_id": node_id, "amount": amount,
                                        "available_at": out["available_at"]})
    return out


# ---- the withdraw transaction ---------------------------------------------------------------


def memo_field(req_id: int) -> str:
    return f"unbond-{req_id}"


def transfer_key(req_id: int) -> str:
    return f"withdraw:{memo_field(req_id)}"


def withdraw_tx_message(rt: ChainRuntime, pubkey: str, req_id: int, amount: int,
                        blockhash: str) -> Message:
    """The exact message both the operator and the market sign (fee payer: market)."""
    return aidp.withdraw_message(rt.cfg, rt.stake_of(pubkey), amount, memo_field(req_id),
                                       blockhash)


def _build_refuses(rt: ChainRuntime, session: Session,
                   row: ChainTransfer) -> tuple[list[Instruction], list[Keypair]]:
    raise RuntimeError(f"{row.idempotency_key}: a withdrawal needs the operator's signature; "
                       "it is sent through /v1/stake/withdraw/submit only")


def _confirm_withdraw(rt: ChainRuntime, session: Session, row: ChainTransfer,
                      st: TxStatus) -> None:
    req = session.execute(select(UnbondingRequest).where(
        UnbondingRequest.transfer_key == row.idempotency_key)).scalar_one()
    req.state = "withdrawn"
    node = session.get(Node, req.node_id)
    if node is not None:  # stake.sync writes the exact chain value next round
        node.stake = max(0, int(node.stake or 0) - row.amount)


async def resolve(rt: ChainRuntime, sessions: sessionmaker[Session], row: ChainTransfer) -> str:
    """Record the chain's verdict on a ``sent`` withdraw row ('sent' while still pending)."""
    if row.state != "sent":
        return row.state
    st = await rt.ledger.status(row.signature or "", int(row.last_valid_block_height or 0))
    return transfers.record_verdict(rt, sessions, row, st, HANDLERS)


def _row(session: Session, key: str) -> ChainTransfer | None:
    row = session.execute(select(ChainTransfer).where(ChainTransfer.idempotency_key == key)
                          ).scalar_one_or_none()
    if row is not None:
        session.expunge(row)
    return row


def _due(session: Session, node_id: str, request_id: int | None) -> UnbondingRequest:
    """The open request to withdraw (the oldest, or ``request_id``), past its period."""
    q = select(UnbondingRequest).where(UnbondingRequest.node_id == node_id,
                                       UnbondingRequest.state == "requested")
    if request_id is not None:
        q = q.where(UnbondingRequest.id == request_id)
    req = session.execute(q.order_by(UnbondingRequest.requested_at).limit(1)).scalar_one_or_none()
    if req is None:
        raise Conflict("No open unbond request to withdraw: request one with "
                       "POST /v1/stake/unbond first.", code="nothing_to_withdraw")
    if req.available_at > utcnow():
        raise Conflict(f"The unbonding period has not elapsed: withdrawal possible from "
                       f"{req.available_at.isoformat()}.", code="unbonding_period_not_elapsed")
    if _pending_slash(session, node_id):
        raise Conflict("A slash of this node has not landed on chain yet; slashes are taken "
                       "before any withdrawal. Try again after it settles.",
                       code="slash_pending")
    open_until = _open_window(session, node_id)
    if open_until is not None:
        raise Conflict("Receipts of this node are still in their challenge window (or being "
                       f"verified) until {open_until.isoformat()}: the stake answers for "
                       "them until they settle.", code="challenge_window_open")
    return req


def _open_window(session: Session, node_id: str) -> datetime | None:
    """When the last open challenge of the node's receipts closes (None: none is open).

    A receipt is open until it is settled or slashed, whatever its window says: one being
    verified, or escalated because no verifier could judge it, may still be slashed."""
    return session.execute(
        select(func.max(Receipt.window_closes_at)).where(
            Receipt.node_id == node_id, Receipt.state.in_(OPEN_RECEIPT_STATES))
    ).scalar()


@dataclass(frozen=True)
class _Ready:
    node_id: str
    req_id: int
    requested: int


async def _policy(rt: ChainRuntime, sessions: sessionmaker[Session], pubkey: str,
                  request_id: int | None) -> tuple[_Ready, ChainTransfer | None]:
    """Policy checks, after resolving an in-flight row of the due request."""
    for _ in range(2):
        with sessions() as session:
            node = _node(session, pubkey)
            req = _due(session, node.id, request_id)
            ready = _Ready(node.id, req.id, req.amount)
            row = _row(session, transfer_key(req.id))
        if row is None or row.state != "sent":
            return ready, row
        outcome = await resolve(rt, sessions, row)
        if outcome == "sent":
            raise Conflict("This withdrawal is in flight on chain; try again shortly.",
                           code="withdrawal_in_flight")
    return ready, row


# ---- step 2: the message to sign -------------------------------------------------------------


async def prepare_withdraw(rt: ChainRuntime, sessions: sessionmaker[Session], *, pubkey: str,
                           issued_at: int, signature: str,
                           now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    _check_signed(pubkey, WITHDRAW_DOMAIN, withdraw_message(pubkey, issued_at), signature,
                  issued_at, now)
    ready, _ = await _policy(rt, sessions, pubkey, None)
    stake = rt.stake_of(pubkey)
    on_chain = await rt.ledger.token_balance(stake.account_pk)
    amount = min(ready.requested, on_chain)
    if amount <= 0:
        raise Conflict("The stake account holds nothing to withdraw.", code="insufficient_stake")
    blockhash, lvbh = await rt.ledger.latest_blockhash()
    key = transfer_key(ready.req_id)
    with sessions.begin() as session:
        row = transfers.plan(session, kind="withdraw", key=key, amount=amount,
                             from_address=stake.account,
                             to_address=str(rt.cfg.ata(Pubkey.from_string(pubkey))),
                             memo=aidp.keyed_memo("withdraw", memo_field(ready.req_id)))
        # a row that never landed (planned, expired, failed) takes the new message; a row
        # another call just sent is left alone
        if session.execute(
            update(ChainTransfer)
            .where(ChainTransfer.id == row.id, ChainTransfer.state.in_(transfers.RESENDABLE))
            .values(state="planned", amount=amount, signature=None, blockhash=str(blockhash),
                    last_valid_block_height=int(lvbh), updated_at=utcnow())
        ).rowcount != 1:
            raise Conflict("This withdrawal is in flight on chain; try again shortly.",
                           code="withdrawal_in_flight")
        session.execute(update(UnbondingRequest).where(UnbondingRequest.id == ready.req_id)
                        .values(transfer_key=key))
    message = withdraw_tx_message(rt, pubkey, ready.req_id, amount, str(blockhash))
    return {"request_id": ready.req_id, "transfer_key": key, "amount": amount,
            "blockhash": str(blockhash), "last_valid_block_height": int(lvbh),
            "message": base64.b64encode(bytes(message)).decode(),
            "signers": [str(k) for k in
                        message.account_keys[: message.header.num_required_signatures]]}


# ---- step 3: co-sign and send -----------------------------------------------------------------


async def submit_withdraw(rt: ChainRuntime, sessions: sessionmaker[Session], *, pubkey: str,
                          request_id: int, blockhash: str, tx_signature: str) -> dict[str, Any]:
    """Check the operator's signature of the step-2 message, co-sign, send exactly once."""
    # policy first (a withdrawn request is "nothing_to_withdraw"): the pubkey names a node, the request is that node's, still due
    ready, row = await _policy(rt, sessions, pubkey, request_id)
    if row is None or row.state != "planned" or row.blockhash != blockhash:
        raise Conflict("No withdrawal message with this blockhash is waiting for a "
                       "signature; call POST /v1/stake/withdraw again.", code="stale_message")
    message = withdraw_tx_message(rt, pubkey, request_id, row.amount, blockhash)
    try:
        op_sig = Signature.from_string(tx_signature)
        ok = op_sig.verify(Pubkey.from_string(pubkey), bytes(message))
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise Forbidden("tx_signature is not this operator's signature of the withdrawal "
                        "message.", param="tx_signature", code="invalid_signature")
    market_sig = rt.market.sign_message(bytes(message))
    by_key = {rt.cfg.market_pk: market_sig, Pubkey.from_string(pubkey): op_sig}
    required = message.account_keys[: message.header.num_required_signatures]
    tx = Transaction.populate(message, [by_key[k] for k in required])
    prepared = PreparedTx(str(market_sig), blockhash, int(row.last_valid_block_height or 0),
                          bytes(tx))
    with sessions.begin() as session:  # recorded before it leaves: one submission wins
        if session.execute(
            update(ChainTransfer)
            .where(ChainTransfer.id == row.id, ChainTransfer.state == "planned",
                   ChainTransfer.blockhash == blockhash)
            .values(state="sent", signature=prepared.signature, updated_at=utcnow())
        ).rowcount != 1:
            raise Conflict("This withdrawal was submitted already.", code="withdrawal_in_flight")
    row.state, row.signature = "sent", prepared.signature
    try:
        await rt.ledger.submit(prepared)
    except TransactionRejected as exc:
        # stays ``sent``: resolved (and re-planned once expired) by the next call
        log.warning("withdraw %s rejected: %s", row.idempotency_key, exc)
        raise Conflict(f"The chain refused the withdrawal: {exc}",
                       code="withdrawal_rejected") from None
    st = await rt.ledger.confirm(prepared.signature, prepared.last_valid_block_height,
                                 timeout=rt.settings.chain.confirm_timeout_s)
    outcome = transfers.record_verdict(rt, sessions, row, st, HANDLERS)
    log.info("withdraw %s: %s", row.idempotency_key, outcome,
             extra={"node_id": ready.node_id, "amount": row.amount})
    return {"request_id": request_id, "transfer_key": row.idempotency_key,
            "amount": row.amount, "signature": prepared.signature, "state": outcome,
            "confirmed": st.state is TxState.CONFIRMED}


def sign_withdraw_message(keypair: Keypair, message_b64: str) -> str:
    """The operator's side of step 3: its Solana signature of the step-2 message."""
    return str(keypair.sign_message(base64.b64decode(message_b64)))


#: the transfers this module plans, for ``market.onchain.handlers``
HANDLERS: transfers.Handlers = {
    "withdraw": transfers.Handler(_build_refuses, _confirm_withdraw),
}
