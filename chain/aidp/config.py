"""The addresses a market settles with (``ChainConfig``), and creating them on a chain.

Every other settlement module takes a ``ChainConfig``; it sits here with the one-time
setup that produces it (mint, deposit account, treasury, funded local wallets), below
the movements that use those addresses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import overload

from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from chain import spl
from chain.ledger.base import Ledger, LedgerError

LAMPORTS_PER_SOL = 1_000_000_000
MINT_SEED = "aidp-mint"
TREASURY_SEED = "aidp-treasury"


class PubkeyField:
    """``<name>_pk``: the ``Pubkey`` of the string field ``<name>``.

    Addresses are kept as base58 text (they serialise to JSON and compare as text);
    instruction builders want ``Pubkey``s. One descriptor serves every such address."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.field = name.removesuffix("_pk")

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> PubkeyField: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Pubkey: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Pubkey | PubkeyField:
        if obj is None:
            return self
        return Pubkey.from_string(getattr(obj, self.field))


@dataclass(frozen=True)
class ChainConfig:
    """The addresses the market settles with. JSON-serialisable for the market's DB/files."""

    mint: str
    decimals: int
    market: str  # market authority (fee payer, deposit owner, delegate, anchors, payouts)
    deposit: str  # token account receiving deposits and pulls; payouts leave from it
    treasury: str  # token account receiving fees and slashes
    program: str = ""  # the aidp_market program holding stake, anchors, cases, payouts

    mint_pk = PubkeyField()
    market_pk = PubkeyField()
    deposit_pk = PubkeyField()
    treasury_pk = PubkeyField()
    program_pk = PubkeyField()

    def ata(self, owner: Pubkey) -> Pubkey:
        return spl.associated_token_address(owner, self.mint_pk)

    @property
    def program_config(self) -> Pubkey:
        """The program's ``MarketConfig`` account (a PDA of the program)."""
        return Pubkey.find_program_address([b"config"], self.program_pk)[0]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChainConfig:
        return cls(**json.loads(text))

    def save(self, path: Path | str) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.to_json() + "\n")
        return target

    @classmethod
    def load(cls, path: Path | str) -> ChainConfig:
        return cls.from_json(Path(path).read_text())


def local_mint_address(market: Pubkey) -> Pubkey:
    return spl.seeded_address(market, MINT_SEED)


async def bootstrap(
    ledger: Ledger,
    market: Keypair,
    *,
    decimals: int = 6,
    mint: Pubkey | str | None = None,
    treasury: Pubkey | str | None = None,
    min_sol: int = 2 * LAMPORTS_PER_SOL,
) -> ChainConfig:
    """Create (or find) the AIDP mint, the deposit account and the treasury. Idempotent.

    Without ``mint`` the mint is created at a deterministic address derived from the
    market key (local chains, devnet). With ``mint`` (mainnet: the real AIDP mint) it must
    exist and have ``decimals``. ``treasury`` defaults to a market-owned seeded account.
    """
    mpk = market.pubkey()
    if ledger.local and await ledger.get_balance(mpk) < min_sol:
        await ledger.airdrop(mpk, 10 * LAMPORTS_PER_SOL)
    mint_pk, ixs = await _mint_setup(ledger, mpk, mint, decimals)
    ixs.append(spl.create_ata_idempotent(mpk, mpk, mint_pk))
    treasury_pk, treasury_ixs = await _treasury_setup(ledger, mpk, mint_pk, treasury)
    await ledger.execute(ixs + treasury_ixs, market)
    return ChainConfig(
        mint=str(mint_pk),
        decimals=decimals,
        market=str(mpk),
        deposit=str(spl.associated_token_address(mpk, mint_pk)),
        treasury=str(treasury_pk),
    )


async def _mint_setup(
    ledger: Ledger, mpk: Pubkey, mint: Pubkey | str | None, decimals: int
) -> tuple[Pubkey, list[Instruction]]:
    """The mint's address and what creates it: nothing when it exists with ``decimals``."""
    ixs: list[Instruction] = []
    if mint is None:
        mint_pk = local_mint_address(mpk)
        info = await ledger.mint_info(mint_pk)
        if info is None:
            rent = await ledger.minimum_balance_for_rent_exemption(spl.MINT_SIZE)
            ixs += [
                spl.create_seeded_account(mpk, mpk, MINT_SEED, rent, spl.MINT_SIZE),
                spl.initialize_mint2(mint_pk, decimals, mpk),
            ]
    else:
        mint_pk = Pubkey.from_string(str(mint))
        info = await ledger.mint_info(mint_pk)
        if info is None:
            raise LedgerError(f"mint {mint_pk} does not exist on this chain")
    if info is not None and info.decimals != decimals:
        raise LedgerError(f"mint {mint_pk} has {info.decimals} decimals, config says {decimals}")
    return mint_pk, ixs


async def _treasury_setup(
    ledger: Ledger, mpk: Pubkey, mint_pk: Pubkey, treasury: Pubkey | str | None
) -> tuple[Pubkey, list[Instruction]]:
    """The treasury's address and what creates the market-owned default one if missing."""
    if treasury is not None:
        return Pubkey.from_string(str(treasury)), []
    treasury_pk = spl.seeded_address(mpk, TREASURY_SEED)
    if await ledger.get_account(treasury_pk) is not None:
        return treasury_pk, []
    rent = await ledger.minimum_balance_for_rent_exemption(spl.TOKEN_ACCOUNT_SIZE)
    return treasury_pk, [
        spl.create_seeded_account(mpk, mpk, TREASURY_SEED, rent, spl.TOKEN_ACCOUNT_SIZE),
        spl.initialize_account3(treasury_pk, mint_pk, mpk),
    ]


async def fund_wallet(
    ledger: Ledger,
    cfg: ChainConfig,
    mint_authority: Keypair,
    wallet: Pubkey,
    *,
    lamports: int = LAMPORTS_PER_SOL,
    tokens: int = 0,
) -> Pubkey:
    """Local chains: airdrop SOL, create the wallet's AIDP account, mint ``tokens`` base units."""
    if lamports:
        await ledger.airdrop(wallet, lamports)
    ata = cfg.ata(wallet)
    ixs = [spl.create_ata_idempotent(mint_authority.pubkey(), wallet, cfg.mint_pk)]
    if tokens:
        ixs.append(
            spl.mint_to_checked(cfg.mint_pk, ata, mint_authority.pubkey(), tokens, cfg.decimals)
        )
    await ledger.execute(ixs, mint_authority)
    return ata
