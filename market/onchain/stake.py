"""Node stake: a vault of the ``aidp_market`` program per operator (``chain.aidp.stake``;
the operator is the node's own key, ``nodes.pubkey``). The operator stakes, unbonds and
withdraws with the program directly; the market cannot move it. The chain is the truth;
``nodes.stake`` mirrors the *bonded* part (staked minus unbonding: what is on its way out
no longer stands behind new work) for routing, slashing decisions and the explorer.

Registration policy: ``settings.chain.min_stake`` (0 = off, the embedded default). The node
link server calls, once the node has authenticated and before ``welcome``::

    from market.onchain.stake import has_min_stake
    if not await has_min_stake(node_pubkey, settings):
        -> send `reject` with reason f"stake below min_stake {settings.chain.min_stake}"
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from chain.aidp.stake import read_stake
from chain.ledger.base import Ledger
from chain.ledger.open import open_ledger
from market.models import ChainTransfer, LedgerEntry, Node
from market.onchain.runtime import ChainRuntime, load_identity
from market.settings import MarketSettings, get_settings


async def stake_on_chain(node_pubkey: str, settings: MarketSettings, *,
                         ledger: Ledger | None = None) -> int:
    """Base units the node has bonded in the program (0 when it has no stake)."""
    cfg, _market, _verifiers = load_identity(settings)
    if ledger is not None:
        info = await read_stake(ledger, cfg, node_pubkey)
        return info.bonded if info else 0
    opened = open_ledger(settings.chain.ledger_url, settings.data_dir)
    try:
        info = await read_stake(opened, cfg, node_pubkey)
        return info.bonded if info else 0
    finally:
        await opened.close()


async def has_min_stake(node_pubkey: str, settings: MarketSettings | None = None, *,
                        ledger: Ledger | None = None) -> bool:
    """True when ``settings.chain.min_stake`` is 0 or the node's on-chain stake reaches it.

    Reads the chain (an RPC ledger in production; with ``ledger_url = "inprocess"`` the
    calling process must be the one holding the chain, or pass ``ledger``)."""
    settings = settings or get_settings()
    if settings.chain.min_stake <= 0:
        return True
    return await stake_on_chain(node_pubkey, settings, ledger=ledger) >= settings.chain.min_stake


def unsettled_slashes(session: Session) -> dict[str, int]:
    """node id → slash amounts the DB took that have not landed on chain yet."""
    confirmed = select(ChainTransfer.idempotency_key).where(ChainTransfer.state == "confirmed")
    rows = session.execute(
        select(LedgerEntry.node_id, func.sum(LedgerEntry.amount))
        .where(LedgerEntry.kind == "slash", LedgerEntry.amount > 0,
               LedgerEntry.idempotency_key.not_in(confirmed))
        .group_by(LedgerEntry.node_id)
    ).all()
    return {node_id: int(total) for node_id, total in rows}


async def read_stakes(
    rt: ChainRuntime, sessions: sessionmaker[Session]
) -> dict[str, tuple[str, int]]:
    """node id → (stake vault, base units bonded on chain)."""
    with sessions() as session:
        nodes = session.execute(select(Node.id, Node.pubkey)).all()
    out = {}
    for node_id, pubkey in nodes:
        info = await read_stake(rt.ledger, rt.cfg, pubkey)
        out[node_id] = (rt.stake_of(pubkey).vault, info.bonded if info else 0)
    return out


async def sync(rt: ChainRuntime, sessions: sessionmaker[Session]) -> dict[str, int]:
    """Write each node's on-chain stake (minus slashes still on their way) to nodes.stake."""
    on_chain = await read_stakes(rt, sessions)
    changed: dict[str, int] = {}
    with sessions.begin() as session:
        pending = unsettled_slashes(session)
        current = dict(session.execute(select(Node.id, Node.stake)).all())
        for node_id, (_account, amount) in on_chain.items():
            value = max(0, amount - pending.get(node_id, 0))
            if current.get(node_id) != value:
                session.execute(update(Node).where(Node.id == node_id).values(stake=value))
                changed[node_id] = value
    return changed
