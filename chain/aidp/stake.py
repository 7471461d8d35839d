"""Node stake: an AIDP account owned by a 2-of-3 SPL multisig {operator, market, arbiter}.

No single party can move stake: a slash needs the market and the arbiter, a withdrawal
the operator and one other. The addresses are derived, so market and node agree on them
without asking the chain, and the withdrawal message is rebuilt the same way on both
sides, so the operator can check what it co-signs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey

from chain import spl
from chain.aidp.config import ChainConfig, PubkeyField
from chain.aidp.memo import keyed_memo
from chain.ledger.base import Ledger, LedgerError

THRESHOLD = 2  # signatures of the three members that move stake


@dataclass(frozen=True)
class Stake:
    """A node's stake: an AIDP account owned by a 2-of-3 SPL multisig."""

    operator: str
    market: str
    arbiter: str
    multisig: str
    account: str
    seed: str

    multisig_pk = PubkeyField()
    account_pk = PubkeyField()
    operator_pk = PubkeyField()

    @property
    def members(self) -> list[str]:
        """The multisig's signers, in the order they are registered."""
        return [self.operator, self.market, self.arbiter]


def stake_for(cfg: ChainConfig, operator: Pubkey, arbiter: Pubkey) -> Stake:
    """Deterministic addresses: a multisig seeded from the market key by (operator, arbiter)."""
    seed = spl.short_seed("ms", operator, arbiter)
    ms = spl.seeded_address(cfg.market_pk, seed)
    return Stake(
        operator=str(operator),
        market=cfg.market,
        arbiter=str(arbiter),
        multisig=str(ms),
        account=str(spl.associated_token_address(ms, cfg.mint_pk)),
        seed=seed,
    )


def create_stake_instructions(
    cfg: ChainConfig, stake: Stake, multisig_rent: int
) -> list[Instruction]:
    market, ms = cfg.market_pk, stake.multisig_pk
    members = [Pubkey.from_string(k) for k in stake.members]
    return [
        spl.create_seeded_account(market, market, stake.seed, multisig_rent, spl.MULTISIG_SIZE),
        spl.initialize_multisig2(ms, members, THRESHOLD),
        spl.create_ata_idempotent(market, ms, cfg.mint_pk),
    ]


async def create_stake(
    ledger: Ledger, cfg: ChainConfig, market: Keypair, operator: Pubkey, arbiter: Pubkey
) -> Stake:
    """Create the 2-of-3 {operator, market, arbiter} multisig and its AIDP account. Idempotent."""
    stake = stake_for(cfg, operator, arbiter)
    existing = await ledger.get_account(stake.multisig_pk)
    if existing is not None:
        ms = spl.parse_multisig(bytes(existing.data))
        if ms.m != THRESHOLD or [str(s) for s in ms.signers] != stake.members:
            raise LedgerError(f"{stake.multisig} exists with another configuration")
        await ledger.execute(
            [spl.create_ata_idempotent(cfg.market_pk, stake.multisig_pk, cfg.mint_pk)], market
        )
        return stake
    rent = await ledger.minimum_balance_for_rent_exemption(spl.MULTISIG_SIZE)
    await ledger.execute(create_stake_instructions(cfg, stake, rent), market)
    return stake


def stake_deposit_instructions(cfg: ChainConfig, stake: Stake, amount: int) -> list[Instruction]:
    """Operator bonds ``amount`` from their AIDP account (signed by the operator)."""
    op = stake.operator_pk
    return [
        spl.transfer_checked(cfg.ata(op), cfg.mint_pk, stake.account_pk, op, amount, cfg.decimals)
    ]


@dataclass(frozen=True)
class StakeInfo:
    amount: int
    m: int
    signers: list[str]


async def read_stake(ledger: Ledger, stake: Stake) -> StakeInfo:
    ms_acc = await ledger.get_account(stake.multisig_pk)
    if ms_acc is None:
        raise LedgerError(f"no stake multisig at {stake.multisig}")
    ms = spl.parse_multisig(bytes(ms_acc.data))
    ta = await ledger.token_account(stake.account_pk)
    if ta is not None and ta.owner != stake.multisig_pk:
        raise LedgerError(f"{stake.account} is not owned by the stake multisig")
    return StakeInfo(ta.amount if ta else 0, ms.m, [str(s) for s in ms.signers])


def _stake_transfer(
    cfg: ChainConfig,
    stake: Stake,
    amount: int,
    dest: Pubkey,
    signers: Sequence[Pubkey],
    memo_text: str,
) -> list[Instruction]:
    """Stake → ``dest`` with the multisig as authority and ``signers`` as its members."""
    return [
        spl.transfer_checked(
            stake.account_pk,
            cfg.mint_pk,
            dest,
            stake.multisig_pk,
            amount,
            cfg.decimals,
            list(signers),
        ),
        spl.memo(memo_text),
    ]


def slash_instructions(
    cfg: ChainConfig,
    stake: Stake,
    amount: int,
    key: str,
    *,
    dest: Pubkey | None = None,
    signers: Sequence[Pubkey] | None = None,
) -> list[Instruction]:
    """Stake → treasury (or ``dest``), co-signed by market and arbiter."""
    signers = signers if signers is not None else [cfg.market_pk, Pubkey.from_string(stake.arbiter)]
    return _stake_transfer(
        cfg, stake, amount, dest or cfg.treasury_pk, signers, keyed_memo("slash", key)
    )


def withdraw_instructions(
    cfg: ChainConfig,
    stake: Stake,
    amount: int,
    key: str,
    *,
    cosigner: Pubkey,
    dest: Pubkey | None = None,
) -> list[Instruction]:
    """Stake → operator's AIDP account, signed by the operator and one other member.
    The unbonding policy (when this is allowed) is the market's; the chain enforces 2-of-3."""
    op = stake.operator_pk
    return _stake_transfer(
        cfg, stake, amount, dest or cfg.ata(op), [op, cosigner], keyed_memo("withdraw", key)
    )


def withdraw_message(
    cfg: ChainConfig, stake: Stake, amount: int, key: str, blockhash: str
) -> Message:
    """The message of a market-co-signed withdrawal (fee payer and co-signer: the market).

    Both sides build it from the same fields, so the operator can check byte for byte
    what it is asked to sign before its signature makes the 2 of 3."""
    ixs = [
        spl.create_ata_idempotent(cfg.market_pk, stake.operator_pk, cfg.mint_pk),
        *withdraw_instructions(cfg, stake, amount, key, cosigner=cfg.market_pk),
    ]
    return Message.new_with_blockhash(ixs, cfg.market_pk, Hash.from_string(blockhash))
