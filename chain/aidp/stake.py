"""Node stake: a token vault of the ``aidp_market`` program, per operator.

The vault's authority is the operator's ``NodeStake`` PDA, so only the program moves it:
back to the operator after the unbonding period (never while a case against the node is
open), or to the buyer and treasury on a quorum of verifier signatures over an anchored
receipt the node signed (``chain.aidp.cases``). The market holds no key that can move
stake. Every instruction here is signed by the operator alone; the addresses are PDAs,
so market, node agent and explorer derive them without asking the chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from solders.instruction import Instruction
from solders.pubkey import Pubkey

from chain import spl
from chain.aidp import program
from chain.aidp.config import ChainConfig, PubkeyField
from chain.aidp.deploy import programdata_address
from chain.ledger.base import Ledger


@dataclass(frozen=True)
class Stake:
    """The program accounts of one operator's stake."""

    operator: str
    address: str  # NodeStake PDA: the vault's authority and the stake's state
    vault: str  # the token account PDA holding the staked AIDP

    operator_pk = PubkeyField()
    address_pk = PubkeyField()
    vault_pk = PubkeyField()


def stake_for(cfg: ChainConfig, operator: Pubkey) -> Stake:
    pid = cfg.program_pk
    return Stake(operator=str(operator), address=str(program.stake_address(pid, operator)),
                 vault=str(program.vault_address(pid, operator)))


def _accounts(cfg: ChainConfig, stake: Stake) -> dict[str, Pubkey]:
    operator = stake.operator_pk
    return {"config": cfg.program_config, "operator": operator, "stake": stake.address_pk,
            "vault": stake.vault_pk, "mint": cfg.mint_pk, "source": cfg.ata(operator),
            "destination": cfg.ata(operator), "tokenProgram": spl.TOKEN_PROGRAM_ID,
            "systemProgram": program.SYSTEM_PROGRAM_ID,
            "programData": programdata_address(cfg.program_pk)}


def register_instructions(cfg: ChainConfig, operator: Pubkey) -> list[Instruction]:
    """Create the operator's NodeStake and vault (once; the operator pays their rent)."""
    return [program.instruction(cfg.program_pk, "registerStake",
                                _accounts(cfg, stake_for(cfg, operator)))]


def stake_instructions(cfg: ChainConfig, operator: Pubkey, amount: int, *,
                       register: bool = False) -> list[Instruction]:
    """Bond ``amount`` base units from the operator's AIDP account into its vault."""
    stake = stake_for(cfg, operator)
    ixs = register_instructions(cfg, operator) if register else []
    return ixs + [program.instruction(cfg.program_pk, "stake", _accounts(cfg, stake),
                                      amount=amount)]


def request_unbond_instructions(cfg: ChainConfig, operator: Pubkey,
                                amount: int) -> list[Instruction]:
    """Start the unbonding period for ``amount`` (a new request restarts the period)."""
    return [program.instruction(cfg.program_pk, "requestUnbond",
                                _accounts(cfg, stake_for(cfg, operator)), amount=amount)]


def withdraw_instructions(cfg: ChainConfig, operator: Pubkey) -> list[Instruction]:
    """Take the unbonded stake back into the operator's AIDP account (created if needed)."""
    return [spl.create_ata_idempotent(operator, operator, cfg.mint_pk),
            program.instruction(cfg.program_pk, "withdraw",
                                _accounts(cfg, stake_for(cfg, operator)))]


@dataclass(frozen=True)
class StakeInfo:
    """A NodeStake account as the program keeps it, plus its vault's balance."""

    staked: int
    unbonding: int
    unbond_at: int  # unix seconds of the last unbond request (0: none)
    challenge_until: int  # unix seconds an open case holds the stake until
    slashed: int
    open_cases: int
    vault_balance: int

    @property
    def bonded(self) -> int:
        """What still stands behind the node's work: staked and not on its way out."""
        return max(0, self.staked - self.unbonding)


async def read_stake(ledger: Ledger, cfg: ChainConfig, operator: Pubkey | str) -> StakeInfo | None:
    """The operator's stake on chain (None when it never registered one)."""
    op = operator if isinstance(operator, Pubkey) else Pubkey.from_string(operator)
    stake = stake_for(cfg, op)
    account = await ledger.get_account(stake.address_pk)
    if account is None or account.owner != cfg.program_pk:
        return None
    fields = program.decode_account("NodeStake", bytes(account.data))
    return StakeInfo(staked=fields["staked"], unbonding=fields["unbonding"],
                     unbond_at=fields["unbondAt"], challenge_until=fields["challengeUntil"],
                     slashed=fields["slashed"], open_cases=fields["openCases"],
                     vault_balance=await ledger.token_balance(stake.vault_pk))
