"""``aidp-market chain reconcile``: the database's view of every chain balance the market
moves, compared with the chain to the base unit.

* deposit account and treasury: the sum of confirmed ``chain_transfers`` in minus out
  (deposits, pulls, backing mints − epoch postings, fees; fees + slashes) vs the token
  balance;
* each payout epoch's vault: posted minus confirmed claims vs its balance;
* each node's payouts: confirmed claim rows vs the leaves the program's claim bitmaps mark
  paid (all of a closed epoch's: the program closes one only once every leaf is paid);
* each node's stake: ``nodes.stake`` plus slashes still on their way vs what the program
  holds bonded (and the program's own count vs its vault's balance).

Any difference is a failure (exit status 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp
from market.models import ChainTransfer, Node
from market.money.journal import Balanced
from market.onchain import stake as stake_mod
from market.onchain.models import ChainPayoutEpoch
from market.onchain.runtime import ChainRuntime
from market.onchain.settle import closed_epochs, load_epoch


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


async def _claimed_on_chain(rt: ChainRuntime, session: Session) -> tuple[dict[str, int], list[Line]]:
    """(node → base units the program's bitmaps say were claimed, one line per epoch vault)."""
    inflow, outflow = _flows(session)
    closed = closed_epochs(session)
    claimed: dict[str, int] = {}
    lines = []
    for epoch in session.execute(select(ChainPayoutEpoch.epoch).order_by(
            ChainPayoutEpoch.epoch)).scalars():
        posted = await aidp.read_epoch(rt.ledger, rt.cfg, epoch)
        vault = aidp.program.payout_vault_address(rt.cfg.program_pk, epoch)
        expected = inflow.get(str(vault), 0) - outflow.get(str(vault), 0)
        balance = await rt.ledger.token_balance(vault)
        if expected or balance:
            lines.append(Line(f"epoch {epoch} vault", str(vault), expected, balance))
        if posted is None and epoch not in closed:
            continue
        for leaf in load_epoch(session, epoch).leaves:  # closed: the program paid them all
            if posted is None or posted.is_claimed(leaf.index):
                claimed[leaf.node] = claimed.get(leaf.node, 0) + leaf.amount
    return claimed, lines


async def reconcile(rt: ChainRuntime, sessions: sessionmaker[Session]) -> list[Line]:
    cfg = rt.cfg
    with sessions() as session:
        inflow, outflow = _flows(session)
        paid = dict(session.execute(
            select(ChainTransfer.to_address, func.sum(ChainTransfer.amount))
            .where(ChainTransfer.state == "confirmed", ChainTransfer.kind == "claim")
            .group_by(ChainTransfer.to_address)
        ).all())
        nodes = session.execute(select(Node.id, Node.pubkey, Node.stake).order_by(Node.id)).all()
        pending_slashes = stake_mod.unsettled_slashes(session)
        claimed, epoch_lines = await _claimed_on_chain(rt, session)

    def expected(address: str) -> int:
        return inflow.get(address, 0) - outflow.get(address, 0)

    lines = [
        Line("deposit account", cfg.deposit, expected(cfg.deposit),
             await rt.ledger.token_balance(cfg.deposit_pk)),
        Line("treasury", cfg.treasury, expected(cfg.treasury),
             await rt.ledger.token_balance(cfg.treasury_pk)),
        *epoch_lines,
    ]
    for node_id, pubkey, db_stake in nodes:
        account = rt.payout_account(pubkey)
        db_paid, chain_paid = int(paid.get(account, 0)), claimed.get(pubkey, 0)
        if db_paid or chain_paid:
            lines.append(Line(f"payouts {node_id}", account, db_paid, chain_paid))
        info = await aidp.read_stake(rt.ledger, cfg, pubkey)
        chain_stake = info.bonded if info else 0
        db_view = int(db_stake) + pending_slashes.get(node_id, 0)
        if db_view or chain_stake:
            lines.append(Line(f"stake {node_id}", rt.stake_of(pubkey).address, db_view,
                              chain_stake))
        if info is not None and info.vault_balance != info.staked:
            lines.append(Line(f"stake vault {node_id}", rt.stake_of(pubkey).vault,
                              info.staked, info.vault_balance))
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
