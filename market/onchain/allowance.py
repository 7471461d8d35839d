"""Non-custodial funding: a buyer ``approve``s the market as delegate of their AIDP account.

The seam into billing is the account's own ``balance`` — billing's hold check
(``balance − held >= hold``) is untouched. For an account with an allowance::

    balance = credited + pulled − charged (+ deposits − refunds, as for anyone)

where ``credited`` (``chain_allowances.credited``) is the spendable on-chain allowance
last seen, ``min(delegated amount, token balance)`` and 0 once revoked. So
``balance − held`` is exactly "on-chain allowance minus what is held or owed", and
``credited − balance`` is what the market still has to pull.

* :func:`register` binds a wallet to an account only with the wallet's own signature
  (``protocol.keys.allowance_message``: market, account, wallet, a recent timestamp
  newer than the last one used): nobody can spend another wallet's approval. One
  wallet funds one account (a unique constraint).
* :func:`sync` reads each allowance from chain and moves ``balance`` by the change of
  ``credited`` (journal ``allowance:…``). When the allowance falls below what is held
  or owed (the buyer revoked before a pull), the balance falls only to what is held
  (the database forbids less) and the rest is kept as ``shortfall``: the next approval
  repays it first, so an unpaid charge is never written off and the next request gets
  402.
* :func:`plan_pulls` pulls what is owed (``credited − balance``), never more than the live
  allowance, with ``transfer_checked`` as delegate (memo ``aidp:pull:v1:<account>.<n>``).
  A confirmed pull of X lowers ``credited`` by X (the chain's allowance fell by X) and
  leaves ``balance`` alone: the owed charges are now paid. While a pull is in flight the
  account is not synced, so nothing is counted twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp
from chain.ledger.base import TxStatus
from market.errors import BadRequest, Conflict, Forbidden, NotFound
from market.models import Account, ChainTransfer, LedgerEntry, new_id, utcnow
from market.onchain import transfers
from market.onchain.models import ChainAllowance
from market.onchain.runtime import ChainRuntime
from protocol.keys import ALLOWANCE_DOMAIN, allowance_message, verify

#: how far a signed registration's timestamp may be from the market's clock
MAX_SKEW_S = 300


def register(session: Session, account_id: str, wallet: str, *, market_id: str,
             signed_at: int, signature: str, now: float | None = None) -> ChainAllowance:
    """Fund ``account_id`` from ``wallet``'s approval (the next :func:`sync` reads it),
    once the wallet has signed :func:`protocol.keys.allowance_message` for it."""
    try:
        Pubkey.from_string(wallet)
    except ValueError:
        raise BadRequest(f"not a Solana address: {wallet!r}", param="wallet") from None
    now = time.time() if now is None else now
    if abs(now - signed_at) > MAX_SKEW_S:
        raise BadRequest(f"signed_at is more than {MAX_SKEW_S}s from the market's clock",
                         param="signed_at")
    message = allowance_message(market_id, account_id, wallet, signed_at)
    if not verify(wallet, ALLOWANCE_DOMAIN, message, signature):
        raise Forbidden("the signature does not prove this wallet asks to fund this account "
                        "at this market", param="signature", code="bad_wallet_signature")
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"no account {account_id}")
    owner = session.execute(
        select(ChainAllowance.account_id).where(ChainAllowance.wallet == wallet)
    ).scalar()
    if owner is not None and owner != account_id:
        raise Conflict("this wallet already funds another account", param="wallet",
                       code="wallet_in_use")
    row = session.get(ChainAllowance, account_id)
    if row is not None and signed_at <= row.signed_at:
        raise Conflict("a registration signed at this time or later was already used",
                       param="signed_at", code="replayed_registration")
    if row is None:
        row = ChainAllowance(account_id=account_id, wallet=wallet, credited=0, delegated=0,
                             token_balance=0, active=False, pulls=0, shortfall=0,
                             signed_at=signed_at, created_at=utcnow())
        session.add(row)
    elif row.wallet != wallet:
        if row.credited:
            raise BadRequest("sync or revoke the current wallet's allowance first", param="wallet")
        if session.execute(select(_pull_in_flight(account_id))).scalar():
            # a pull is rebuilt from this wallet until it lands or expires: switching now
            # would make its recorded transaction unreproducible
            raise BadRequest("a pull from the current wallet is in flight; retry shortly",
                             param="wallet")
        row.wallet = wallet
    row.signed_at = signed_at
    account.wallet = wallet
    session.flush()
    return row


def _pull_in_flight(account_id: str):  # type: ignore[no-untyped-def]
    return exists().where(
        ChainTransfer.kind == "pull",
        ChainTransfer.state.in_(transfers.ACTIVE),
        ChainTransfer.idempotency_key.like(f"pull:{account_id}.%"),
    )


@dataclass
class SyncResult:
    synced: int = 0
    changed: dict[str, int] = field(default_factory=dict)  # account → balance change


async def sync(rt: ChainRuntime, sessions: sessionmaker[Session],
               account_ids: list[str] | None = None) -> SyncResult:
    with sessions() as session:
        query = select(ChainAllowance.account_id, ChainAllowance.wallet, ChainAllowance.credited)
        if account_ids is not None:
            query = query.where(ChainAllowance.account_id.in_(account_ids))
        rows = session.execute(query).all()
    result = SyncResult()
    for account_id, wallet, credited in rows:
        owner = Pubkey.from_string(wallet)
        live = await aidp.allowance(rt.ledger, rt.cfg, owner)  # the pull limit
        ta = await rt.ledger.token_account(rt.cfg.ata(owner))  # for display
        ours = ta is not None and ta.delegate == rt.cfg.market_pk
        with sessions.begin() as session:
            if session.execute(select(_pull_in_flight(account_id))).scalar():
                continue  # its credited amount moves when the pull confirms
            done = session.execute(
                update(ChainAllowance)
                .where(ChainAllowance.account_id == account_id,
                       ChainAllowance.credited == credited)
                .values(credited=live,
                        delegated=ta.delegated_amount if ta and ours else 0,
                        token_balance=ta.amount if ta else 0,
                        active=bool(ta and ours and ta.state == 1),
                        refreshed_at=utcnow())
            ).rowcount
            if done != 1:
                continue  # another sync moved it: its view wins
            result.synced += 1
            change = _apply_change(session, account_id, live - credited)
            if change:
                session.add(LedgerEntry(
                    kind="allowance", idempotency_key=new_id(f"allowance:{account_id}"),
                    amount=change, account_id=account_id,
                    memo=f"on-chain allowance of {wallet} is now {live}",
                ))
                result.changed[account_id] = change
    return result


def _apply_change(session: Session, account_id: str, delta: int) -> int:
    """Move the balance by an allowance change ``delta``; returns how much it moved.

    A fall is taken from what is spendable only (never below what is held: the
    database refuses that); the part it cannot take becomes ``shortfall``. A rise
    repays the shortfall first."""
    if delta == 0:
        return 0
    balance, held = session.execute(
        select(Account.balance, Account.held).where(Account.id == account_id).with_for_update()
    ).one()
    shortfall = session.execute(
        select(ChainAllowance.shortfall).where(ChainAllowance.account_id == account_id)
    ).scalar_one()
    if delta < 0:
        taken = min(-delta, balance - held)
        shortfall += -delta - taken
        change = -taken
    else:
        repaid = min(delta, shortfall)
        shortfall -= repaid
        change = delta - repaid
    session.execute(update(ChainAllowance).where(ChainAllowance.account_id == account_id)
                    .values(shortfall=shortfall))
    if change:
        session.execute(update(Account).where(Account.id == account_id)
                        .values(balance=Account.balance + change))
    return change


# ---- pulls ----------------------------------------------------------------------------------


def _key_of(row: ChainTransfer) -> tuple[str, str]:
    memo = aidp.parse_memo(row.memo)
    if memo is None or memo.kind != "pull":
        raise ValueError(f"chain transfer {row.idempotency_key}: unexpected memo {row.memo!r}")
    key = memo.fields[0]
    return key.rsplit(".", 1)[0], key


def _build_pull(
    rt: ChainRuntime, session: Session, row: ChainTransfer
) -> tuple[list[Instruction], list[Keypair]]:
    account_id, key = _key_of(row)
    wallet = session.execute(
        select(ChainAllowance.wallet).where(ChainAllowance.account_id == account_id)
    ).scalar_one()
    return aidp.pull_instructions(rt.cfg, Pubkey.from_string(wallet), row.amount, key), []


def _confirm_pull(rt: ChainRuntime, session: Session, row: ChainTransfer, st: TxStatus) -> None:
    account_id, key = _key_of(row)
    session.execute(update(ChainAllowance).where(ChainAllowance.account_id == account_id)
                    .values(credited=ChainAllowance.credited - row.amount))
    session.add(LedgerEntry(kind="pull", idempotency_key=f"chain:pull:{key}", amount=row.amount,
                            account_id=account_id, memo=f"pulled on chain {row.signature}"))



async def plan_pulls(rt: ChainRuntime, sessions: sessionmaker[Session]) -> list[int]:
    """Plan one pull per account that owes charges; cancel unsent pulls the allowance no
    longer covers (nothing moved for them) so a revocation is never blocked."""
    with sessions() as session:
        rows = session.execute(
            select(ChainAllowance.account_id, ChainAllowance.wallet, ChainAllowance.credited,
                   Account.balance)
            .join(Account, Account.id == ChainAllowance.account_id)
        ).all()
        unsent = session.execute(
            select(ChainTransfer.id, ChainTransfer.idempotency_key, ChainTransfer.amount,
                   ChainTransfer.state)
            .where(ChainTransfer.kind == "pull", ChainTransfer.state.in_(transfers.RESENDABLE))
        ).all()
    live: dict[str, int] = {}
    for account_id, wallet, _credited, _balance in rows:
        live[account_id] = await aidp.allowance(rt.ledger, rt.cfg, Pubkey.from_string(wallet))
    ids: list[int] = []
    with sessions.begin() as session:
        for tid, key, amount, state in unsent:
            account_id = key.removeprefix("pull:").rsplit(".", 1)[0]
            if amount > live.get(account_id, 0):
                session.execute(update(ChainTransfer)
                                .where(ChainTransfer.id == tid, ChainTransfer.state == state)
                                .values(state="cancelled", updated_at=utcnow()))
        for account_id, _wallet, credited, balance in rows:
            owed = credited - balance
            amount = min(owed, live[account_id])
            if amount <= 0 or session.execute(select(_pull_in_flight(account_id))).scalar():
                continue
            allowance = session.get(ChainAllowance, account_id)
            assert allowance is not None
            allowance.pulls += 1
            key = f"{account_id}.{allowance.pulls}"
            row = transfers.plan(
                session, kind="pull", key=f"pull:{key}", amount=amount,
                from_address=str(rt.cfg.ata(Pubkey.from_string(allowance.wallet))),
                to_address=rt.cfg.deposit, memo=aidp.keyed_memo("pull", key),
            )
            ids.append(row.id)
    return ids


#: the transfers this module plans, for ``market.onchain.handlers``
HANDLERS: transfers.Handlers = {
    "pull": transfers.Handler(_build_pull, _confirm_pull),
}
