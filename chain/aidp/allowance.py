"""Allowances: a buyer delegates up to an amount to the market, which pulls from it.

The buyer signs once (approve, or revoke to stop); each pull is then the market's own
transaction, so how much is still pullable has to be read from the chain before one.
"""

from __future__ import annotations

from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from chain import spl
from chain.aidp.config import ChainConfig
from chain.aidp.memo import keyed_memo
from chain.ledger.base import AllowanceExceeded, Ledger, PreparedTx

TOKEN_ACCOUNT_INITIALIZED = 1  # spl.TokenAccount.state of a usable (not frozen) account


def approve_instructions(cfg: ChainConfig, buyer: Pubkey, amount: int) -> list[Instruction]:
    """What a buyer signs to let the market pull up to ``amount`` (replaces any earlier one)."""
    return [
        spl.approve_checked(cfg.ata(buyer), cfg.mint_pk, cfg.market_pk, buyer, amount, cfg.decimals)
    ]


def revoke_instructions(cfg: ChainConfig, buyer: Pubkey) -> list[Instruction]:
    return [spl.revoke(cfg.ata(buyer), buyer)]


async def allowance(ledger: Ledger, cfg: ChainConfig, buyer: Pubkey) -> int:
    """What the market may still pull from ``buyer``: min(delegated, balance); 0 if revoked."""
    ta = await ledger.token_account(cfg.ata(buyer))
    if ta is None or ta.delegate != cfg.market_pk or ta.state != TOKEN_ACCOUNT_INITIALIZED:
        return 0
    return min(ta.delegated_amount, ta.amount)


def pull_instructions(cfg: ChainConfig, buyer: Pubkey, amount: int, key: str) -> list[Instruction]:
    return [
        spl.transfer_checked(
            cfg.ata(buyer), cfg.mint_pk, cfg.deposit_pk, cfg.market_pk, amount, cfg.decimals
        ),
        spl.memo(keyed_memo("pull", key), [cfg.market_pk]),
    ]


async def prepare_pull(
    ledger: Ledger,
    cfg: ChainConfig,
    market: Keypair,
    buyer: Pubkey,
    amount: int,
    key: str,
    *,
    precheck: bool = True,
) -> PreparedTx:
    """Build a delegate pull. The pre-check refuses more than the live allowance; the
    chain refuses it anyway (SPL Token checks ``delegated_amount``)."""
    if precheck:
        available = await allowance(ledger, cfg, buyer)
        if amount > available:
            raise AllowanceExceeded(f"pull of {amount} exceeds allowance {available} of {buyer}")
    return await ledger.prepare(pull_instructions(cfg, buyer, amount, key), market)
