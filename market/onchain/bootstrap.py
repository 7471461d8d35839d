"""``aidp-market chain init``: the market's chain identity and accounts. Idempotent.

1. keypairs ``market.json`` and ``verifier-<n>.json`` under ``<data_dir>/chain`` (mode
   600), created once;
2. the AIDP mint (local chains: created at an address derived from the market key, with
   ``token_decimals``; mainnet: ``chain_mint`` must exist with those decimals), the deposit
   account and the treasury (``chain.aidp.bootstrap``);
2b. the ``aidp_market`` program: on a local chain deployed from ``chain.program_path``
   through the upgradeable loader; on a public one ``chain.program_id``; initialised with
   the verifier keys, quorum and periods, and made immutable (``chain.aidp.install``);
3. local chains only: demo wallets ``demo-<n>.json`` funded with SOL and AIDP, and the
   deposit account backed by ``chain_demo_tokens`` (recorded as a ``mint`` transfer so
   ``reconcile`` balances) — so credit granted off chain in development can be paid out;
4. ``config.json`` (the ``ChainConfig``).

A second run finds everything in place and sends nothing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from solders.instruction import Instruction
from solders.keypair import Keypair
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp, spl
from chain.ledger.base import Ledger
from chain.ledger.open import open_ledger
from market.models import ChainTransfer
from market.onchain import transfers
from market.onchain.runtime import ChainRuntime, chain_dir, config_path, verifier_paths
from market.settings import MarketSettings
from protocol.keys import load_keypair, save_keypair

BACKING_KEY = "mint:deposit-backing"


@dataclass
class InitResult:
    cfg: aidp.ChainConfig
    verifiers: list[str]
    created: list[str] = field(default_factory=list)  # what this run made
    demo_wallets: list[tuple[str, Path]] = field(default_factory=list)


def _keypair(path: Path, created: list[str], what: str) -> Keypair:
    if path.exists():
        return load_keypair(path)
    kp = Keypair()
    save_keypair(kp, path)
    created.append(f"{what} keypair {kp.pubkey()} ({path})")
    return kp


async def _accounts_exist(ledger: Ledger, cfg: aidp.ChainConfig) -> bool:
    mint = await ledger.mint_info(cfg.mint_pk)
    return (
        mint is not None
        and mint.decimals == cfg.decimals
        and await ledger.token_account(cfg.deposit_pk) is not None
        and await ledger.token_account(cfg.treasury_pk) is not None
    )


async def init(
    settings: MarketSettings,
    sessions: sessionmaker[Session],
    *,
    ledger: Ledger | None = None,
    demo_wallets: int | None = None,
) -> InitResult:
    base = chain_dir(settings)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    _check_periods(settings)
    created: list[str] = []
    market = _keypair(base / "market.json", created, "market")
    verifiers = [_keypair(path, created, f"verifier {n}")
                 for n, path in enumerate(verifier_paths(settings), start=1)]
    own = ledger is None
    led = ledger or open_ledger(settings.chain.ledger_url, settings.data_dir)
    try:
        path = config_path(settings)
        cfg = aidp.ChainConfig.load(path) if path.exists() else None
        if cfg is not None and cfg.market != str(market.pubkey()):
            raise RuntimeError(f"{path} belongs to market {cfg.market}, not {market.pubkey()}")
        if cfg is None or not await _accounts_exist(led, cfg):
            cfg = await aidp.bootstrap(
                led, market, decimals=settings.billing.token_decimals, mint=settings.chain.mint,
                treasury=settings.chain.treasury,
            )
            created.append(f"mint {cfg.mint}, deposit {cfg.deposit}, treasury {cfg.treasury}")
        cfg = await _program(settings, led, market, cfg, verifiers, created)
        if not path.exists() or aidp.ChainConfig.load(path) != cfg:
            cfg.save(path)
            os.chmod(path, 0o600)
            created.append(f"config {path}")
        result = InitResult(cfg=cfg, verifiers=[str(v.pubkey()) for v in verifiers],
                            created=created)
        if led.local and settings.chain.mint is None:
            await _local_funding(settings, sessions, led, cfg, market, base, result,
                                 settings.chain.demo_wallets if demo_wallets is None
                                 else demo_wallets)
        return result
    finally:
        if own:
            await led.close()


def _check_periods(settings: MarketSettings) -> None:
    """A node may leave once its unbonding period ends: by then every receipt of its
    must have closed its window, been anchored and had its case opened."""
    chain = settings.chain
    needed = (settings.verify.challenge_window_s + chain.anchor_interval_s
              + chain.settle_interval_s)
    if chain.unbonding_period_s < needed:
        raise RuntimeError(
            f"chain.unbonding_period_s ({chain.unbonding_period_s}) must be at least the "
            f"challenge window plus the anchor and settle intervals ({needed:.0f} s), or a "
            "node could withdraw before its fraud is slashed")
    if chain.verifier_quorum > chain.verifiers:
        raise RuntimeError(f"chain.verifier_quorum ({chain.verifier_quorum}) is more than "
                           f"the verifiers ({chain.verifiers})")


async def _program(settings: MarketSettings, ledger: Ledger, market: Keypair,
                   cfg: aidp.ChainConfig, verifiers: list[Keypair],
                   created: list[str]) -> aidp.ChainConfig:
    """The market's program: deployed here on a local chain, named by config elsewhere."""
    chain = settings.chain
    if chain.program_id and cfg.program != chain.program_id:
        cfg = dataclasses.replace(cfg, program=chain.program_id)
    elif cfg.program and await ledger.get_account(cfg.program_pk) is None:
        cfg = dataclasses.replace(cfg, program="")  # a fresh local chain: deploy again
    elf = None
    if not cfg.program:
        if not ledger.local:
            raise RuntimeError("set chain.program_id: the program is deployed on public "
                               "clusters by whoever publishes it, not by chain init")
        if not chain.program_path.exists():
            raise RuntimeError(f"no program binary at {chain.program_path}: run `make programs`")
        elf = chain.program_path.read_bytes()
    params = aidp.ProgramParams(
        verifiers=[v.pubkey() for v in verifiers], quorum=chain.verifier_quorum,
        fee_bps=0, min_stake=chain.min_stake, unbonding_period_s=chain.unbonding_period_s,
        max_slash_per_receipt=chain.max_slash_per_receipt,
        challenge_period_s=chain.challenge_period_s)
    cfg, done = await aidp.install(ledger, market, cfg, params, elf)
    created.extend(done)
    return cfg


async def _local_funding(
    settings: MarketSettings,
    sessions: sessionmaker[Session],
    ledger: Ledger,
    cfg: aidp.ChainConfig,
    market: Keypair,
    base: Path,
    result: InitResult,
    demo_wallets: int,
) -> None:
    tokens = settings.chain.demo_tokens
    for n in range(1, demo_wallets + 1):
        path = base / f"demo-{n}.json"
        wallet = _keypair(path, result.created, f"demo wallet {n}")
        result.demo_wallets.append((str(wallet.pubkey()), path))
        if await ledger.token_account(cfg.ata(wallet.pubkey())) is None:
            await aidp.fund_wallet(ledger, cfg, market, wallet.pubkey(), tokens=tokens)
            result.created.append(f"funded {wallet.pubkey()} with {tokens} base units")
    if tokens <= 0:
        return
    with sessions.begin() as session:
        row = transfers.plan(
            session, kind="mint", key=BACKING_KEY, amount=tokens, from_address=None,
            to_address=cfg.deposit, memo=aidp.keyed_memo("mint", "deposit-backing"),
        )
    if row.state != "confirmed":
        rt = ChainRuntime(settings, cfg, market, [], ledger)
        outcome = await transfers.drive(rt, sessions, [row.id], HANDLERS)
        if outcome.confirmed:
            result.created.append(f"backed the deposit account with {tokens} base units")


def _build_mint(
    rt: ChainRuntime, session: Session, row: ChainTransfer
) -> tuple[list[Instruction], list[Keypair]]:
    cfg = rt.cfg
    return [
        spl.mint_to_checked(cfg.mint_pk, cfg.deposit_pk, cfg.market_pk, row.amount, cfg.decimals),
        spl.memo(row.memo or "", [cfg.market_pk]),
    ], []



async def stake_from_demo_wallet(settings: MarketSettings, node: Keypair, amount: int, *,
                                 ledger: Ledger | None = None, wallet: int = 1) -> int:
    """Local chains: bond ``amount`` of a demo wallet's AIDP as ``node``'s stake, as an
    operator would (the wallet pays the node's AIDP account, the node stakes it into its
    vault of the program). Returns the bonded stake; tops up only what is missing."""
    base = chain_dir(settings)
    market = load_keypair(base / "market.json")
    demo = load_keypair(base / f"demo-{wallet}.json")
    own = ledger is None
    led = ledger or open_ledger(settings.chain.ledger_url, settings.data_dir)
    try:
        if not led.local:
            raise RuntimeError("demo staking is for local chains only")
        cfg = aidp.ChainConfig.load(config_path(settings))
        info = await aidp.read_stake(led, cfg, node.pubkey())
        have = info.bonded if info else 0
        missing = amount - have
        if missing <= 0:
            return have
        await aidp.fund_wallet(led, cfg, market, node.pubkey())  # SOL for fees, its ATA
        await led.execute([spl.transfer_checked(
            cfg.ata(demo.pubkey()), cfg.mint_pk, cfg.ata(node.pubkey()), demo.pubkey(),
            missing, cfg.decimals)], demo)
        await led.execute(aidp.stake_instructions(cfg, node.pubkey(), missing,
                                                  register=info is None), node)
        info = await aidp.read_stake(led, cfg, node.pubkey())
        return info.bonded if info else 0
    finally:
        if own:
            await led.close()


#: the transfers this module plans, for ``market.onchain.handlers``
HANDLERS: transfers.Handlers = {
    "mint": transfers.Handler(_build_mint),
}
