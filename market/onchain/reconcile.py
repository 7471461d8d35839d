"""``aidp-market chain reconcile``: the database's view of every chain balance the market
moves, compared with the chain to the base unit.

* deposit account and treasury: the sum of confirmed ``chain_transfers`` in minus out
  (deposits, pulls, backing mints − payouts, fees; fees + slashes) vs the token balance;
* each node's payouts: confirmed payout rows vs the payouts the chain shows arriving at
  the node's AIDP account (transactions paid by the market carrying a payout memo);
* each node's stake: ``nodes.stake`` plus slashes still on their way vs the stake account.

Any difference is a failure (exit status 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from market.models import ChainTransfer, Node
from market.money.journal import Balanced
from market.onchain import stake as stake_mod
from market.onchain.runtime import ChainRuntime

PAYOUT_MEMO = "aidp:payout:v1:"


@dataclass(frozen=True)
class Line(Balanced):
    item: str
    address: str
    db: int
    chain: int

    @property
    def diff(self) -> int:
        return self.chain - self.db


def _flows(session: Session) -> tuple[dict[str, int], dict[str, int]]:
    confirmed = ChainTransfer.state == "confirmed"
    inflow = dict(session.execute(
        select(ChainTransfer.to_address, func.sum(ChainTransfer.amount))
        .where(confirmed, ChainTransfer.to_address.is_not(None))
        .group_by(ChainTransfer.to_address)
    ).all())
    outflow = dict(session.execute(
        select(ChainTransfer.from_address, func.sum(ChainTransfer.amount))
        .where(confirmed, ChainTransfer.from_address.is_not(None))
        .group_by(ChainTransfer.from_address)
    ).all())
    return ({k: int(v) for k, v in inflow.items()}, {k: int(v) for k, v in outflow.items()})


async def chain_payouts(rt: ChainRuntime, account: str) -> int:
    """Base units the market paid to ``account`` in payout-memo transactions, from history."""
    from solders.pubkey import Pubkey

    total, before = 0, None
    while True:
        page = await rt.ledger.signatures_for_address(Pubkey.from_string(account), before=before)
        for info in page:
            if info.err is not None or PAYOUT_MEMO not in (info.memo or ""):
                continue
            tx = await rt.ledger.get_transaction(info.signature)
            if (
                tx is not None
                and tx.ok
                and tx.account_keys[0] == rt.cfg.market  # paid by the market, not a look-alike
                and any(m.startswith(PAYOUT_MEMO) for m in tx.memos)
            ):
                total += tx.token_delta(account)
        if len(page) < 1000:
            return total
        before = page[-1].signature


async def reconcile(rt: ChainRuntime, sessions: sessionmaker[Session]) -> list[Line]:
    cfg = rt.cfg
    with sessions() as session:
        inflow, outflow = _flows(session)
        payouts = dict(session.execute(
            select(ChainTransfer.to_address, func.sum(ChainTransfer.amount))
            .where(ChainTransfer.state == "confirmed", ChainTransfer.kind == "payout")
            .group_by(ChainTransfer.to_address)
        ).all())
        nodes = session.execute(select(Node.id, Node.pubkey, Node.stake).order_by(Node.id)).all()
        pending_slashes = stake_mod.unsettled_slashes(session)

    def expected(address: str) -> int:
        return inflow.get(address, 0) - outflow.get(address, 0)

    lines = [
        Line("deposit account", cfg.deposit, expected(cfg.deposit),
             await rt.ledger.token_balance(cfg.deposit_pk)),
        Line("treasury", cfg.treasury, expected(cfg.treasury),
             await rt.ledger.token_balance(cfg.treasury_pk)),
    ]
    for node_id, pubkey, db_stake in nodes:
        account = rt.payout_account(pubkey)
        db_paid = int(payouts.get(account, 0))
        chain_paid = await chain_payouts(rt, account)
        if db_paid or chain_paid:
            lines.append(Line(f"payouts {node_id}", account, db_paid, chain_paid))
        st = rt.stake_of(pubkey)
        chain_stake = await rt.ledger.token_balance(st.account_pk)
        db_view = int(db_stake) + pending_slashes.get(node_id, 0)
        if db_view or chain_stake:
            lines.append(Line(f"stake {node_id}", st.account, db_view, chain_stake))
    return lines


def render(lines: list[Line]) -> str:
    head = ("item", "address", "database", "chain", "difference", "status")
    rows = [head] + [
        (ln.item, ln.address, str(ln.db), str(ln.chain), f"{ln.diff:+d}",
         "ok" if ln.ok else "MISMATCH")
        for ln in lines
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(
            cell.rjust(w) if 2 <= i <= 4 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    bad = sum(not ln.ok for ln in lines)
    out.append(f"{len(lines)} balances compared, {bad} mismatch{'es' if bad != 1 else ''}")
    return "\n".join(out)
