"""Putting the ``aidp_market`` program on a chain for a market, and reading its config.

On a local chain the market deploys the program itself through the upgradeable loader
(the real deploy path, ``chain.aidp.deploy``), initialises its ``MarketConfig`` over the
market's mint and treasury, and gives up the upgrade authority in the same transaction:
the program takes funds only once nobody can change its rules. On a public cluster the
program is deployed once by whoever publishes it; a market only initialises it (or finds
it initialised with its own authority, mint and treasury).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from chain.aidp import program
from chain.aidp.config import ChainConfig
from chain.aidp.deploy import deploy_to, make_immutable, programdata_address, upgrade_authority
from chain.ledger.base import Ledger, LedgerError


@dataclass(frozen=True)
class ProgramParams:
    """The ``MarketConfig`` a market initialises (the program bounds each field)."""

    verifiers: list[Pubkey] = field(default_factory=list)
    quorum: int = 1
    fee_bps: int = 0
    min_stake: int = 0
    unbonding_period_s: int = 7 * 24 * 3600
    max_slash_per_receipt: int = 10**15
    challenge_period_s: int = 24 * 3600


def initialize_instructions(cfg: ChainConfig, params: ProgramParams) -> list[Instruction]:
    """``initialize`` by the upgrade authority, then the authority given up (one
    transaction: nothing can run between the two)."""
    pid = cfg.program_pk
    init = program.instruction(pid, "initialize", {
        "config": cfg.program_config, "authority": cfg.market_pk, "mint": cfg.mint_pk,
        "treasury": cfg.treasury_pk, "systemProgram": program.SYSTEM_PROGRAM_ID,
        "programData": programdata_address(pid)},
        feeBps=params.fee_bps, quorum=params.quorum, verifiers=params.verifiers,
        minStake=params.min_stake, unbondingPeriod=params.unbonding_period_s,
        maxSlashPerReceipt=params.max_slash_per_receipt,
        challengePeriod=params.challenge_period_s)
    return [init, make_immutable(pid, cfg.market_pk)]


async def read_config(ledger: Ledger, cfg: ChainConfig) -> program.MarketConfig | None:
    """The program's ``MarketConfig`` (None before ``initialize``)."""
    account = await ledger.get_account(cfg.program_config)
    if account is None or account.owner != cfg.program_pk:
        return None
    return program.MarketConfig.decode(bytes(account.data))


async def is_immutable(ledger: Ledger, program_id: Pubkey) -> bool:
    account = await ledger.get_account(programdata_address(program_id))
    return account is not None and upgrade_authority(bytes(account.data)) is None


def _matches(found: program.MarketConfig, cfg: ChainConfig, params: ProgramParams) -> bool:
    return (found.authority == cfg.market_pk and found.mint == cfg.mint_pk
            and found.treasury == cfg.treasury_pk and found.verifiers == params.verifiers
            and found.quorum == params.quorum)


async def install(ledger: Ledger, market: Keypair, cfg: ChainConfig, params: ProgramParams,
                  elf: bytes | None) -> tuple[ChainConfig, list[str]]:
    """The program of ``cfg`` (deployed from ``elf`` first when ``cfg.program`` is empty),
    initialised with ``params`` and immutable. Idempotent; returns what it did."""
    done: list[str] = []
    if not cfg.program:
        if elf is None:
            raise LedgerError("no program id configured and no program binary to deploy")
        pid = await deploy_to(ledger, elf, market)
        await ledger.advance_slots(1)  # a program is callable from the slot after its deploy
        cfg = dataclasses.replace(cfg, program=str(pid))
        done.append(f"deployed the aidp_market program {pid}")
    found = await read_config(ledger, cfg)
    if found is None:
        await ledger.execute(initialize_instructions(cfg, params), market)
        done.append(f"initialised it ({params.quorum} of {len(params.verifiers)} verifiers) "
                    "and made it immutable")
    elif not _matches(found, cfg, params):
        raise LedgerError(f"program {cfg.program} is initialised for another market or "
                          "verifier set")
    if not await is_immutable(ledger, cfg.program_pk):
        raise LedgerError(f"program {cfg.program} can still be upgraded: it takes no funds")
    return cfg, done
