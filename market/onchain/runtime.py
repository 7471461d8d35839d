"""Where the market's chain identity lives and how a settlement step reaches the chain.

``aidp-market chain init`` writes, under ``<data_dir>/chain/`` (files mode 600):

* ``market.json`` — the market's keypair (fee payer, deposit owner, delegate for
  allowances, the program's authority: anchors, cases, payout roots); solana-keygen format;
* ``verifier-<n>.json`` — verifier keys of the program's verifier set; a process signs
  verdicts with those it holds (a public deployment gives each verifier its own host);
* ``config.json`` — the :class:`chain.aidp.ChainConfig` (mint, decimals, market,
  deposit and treasury accounts, the program id).

A :class:`ChainRuntime` bundles those with an open :class:`chain.ledger.base.Ledger`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from chain.aidp.config import ChainConfig
from chain.aidp.stake import Stake, stake_for
from chain.ledger.base import Ledger
from chain.ledger.open import open_ledger
from market.settings import MarketSettings
from protocol.keys import load_keypair


class ChainNotInitialized(RuntimeError):
    def __init__(self, path: Path):
        super().__init__(f"no chain configuration at {path}: run `aidp-market chain init`")
        self.path = path


def chain_dir(settings: MarketSettings) -> Path:
    return Path(settings.data_dir) / "chain"


def config_path(settings: MarketSettings) -> Path:
    return chain_dir(settings) / "config.json"


@dataclass
class ChainRuntime:
    settings: MarketSettings
    cfg: ChainConfig
    market: Keypair
    verifiers: list[Keypair]
    ledger: Ledger

    def stake_of(self, operator: str | Pubkey) -> Stake:
        """A node operator's stake accounts in the program (PDAs: deterministic)."""
        op = operator if isinstance(operator, Pubkey) else Pubkey.from_string(operator)
        return stake_for(self.cfg, op)

    def payout_account(self, owner: str) -> str:
        return str(self.cfg.ata(Pubkey.from_string(owner)))


def verifier_paths(settings: MarketSettings) -> list[Path]:
    return [chain_dir(settings) / f"verifier-{n}.json"
            for n in range(1, settings.chain.verifiers + 1)]


def load_identity(settings: MarketSettings) -> tuple[ChainConfig, Keypair, list[Keypair]]:
    """(config, market keypair, the verifier keypairs held here); ``ChainNotInitialized``
    before init."""
    path = config_path(settings)
    if not path.exists():
        raise ChainNotInitialized(path)
    cfg = ChainConfig.load(path)
    if not cfg.program:
        raise ChainNotInitialized(path)
    held = [load_keypair(p) for p in verifier_paths(settings) if p.exists()]
    return cfg, load_keypair(chain_dir(settings) / "market.json"), held


@contextlib.asynccontextmanager
async def open_runtime(
    settings: MarketSettings, ledger: Ledger | None = None
) -> AsyncIterator[ChainRuntime]:
    """A runtime on ``ledger`` (left open) or on a ledger opened from the settings (closed
    on exit). With ``ledger_url = "inprocess"`` only one process may hold the chain at a
    time: run ``aidp-ledger serve`` when API, worker and CLI must share it."""
    cfg, market, verifiers = load_identity(settings)
    if ledger is not None:
        yield ChainRuntime(settings, cfg, market, verifiers, ledger)
        return
    opened = open_ledger(settings.chain.ledger_url, settings.data_dir)
    try:
        yield ChainRuntime(settings, cfg, market, verifiers, opened)
    finally:
        await opened.close()
