"""Fixtures for the on-chain layer: every test that takes ``ledger`` runs twice, on the
in-process LiteSVM backend and through a real ``aidp-ledger`` server with solana-py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from chain.aidp.config import ChainConfig, bootstrap, fund_wallet
from chain.ledger.base import Ledger
from chain.ledger.open import open_ledger
from chain.localnet.cli import LedgerProcess
from tests.support.program import program_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ledger_server(tmp_path_factory: pytest.TempPathFactory):
    server = LedgerProcess(tmp_path_factory.mktemp("aidp-ledger"), cwd=REPO).start()
    yield server
    server.stop()


BACKENDS = ["inprocess", "rpc"]


@pytest.fixture(params=BACKENDS)
async def ledger(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "inprocess":
        led: Ledger = open_ledger("inprocess", tmp_path)
    else:
        led = open_ledger(request.getfixturevalue("ledger_server").url)
    yield led
    await led.close()


@dataclass
class Market:
    """A bootstrapped market on a fresh mint (fresh keys isolate tests on a shared server)."""

    ledger: Ledger
    key: Keypair
    cfg: ChainConfig

    async def wallet(self, tokens: int = 0, lamports: int = 1_000_000_000) -> Keypair:
        kp = Keypair()
        await fund_wallet(
            self.ledger, self.cfg, self.key, kp.pubkey(), lamports=lamports, tokens=tokens
        )
        return kp

    async def tokens(self, owner: Pubkey) -> int:
        return await self.ledger.token_balance(self.cfg.ata(owner))


@pytest.fixture
async def market(ledger: Ledger) -> Market:
    key = Keypair()
    cfg = await bootstrap(ledger, key, decimals=6)
    return Market(ledger, key, cfg)


@pytest.fixture(scope="session")
def aidp_program() -> bytes:
    """The ``aidp_market`` program built from source (clang-19 and programs/link.py)."""
    return program_path().read_bytes()
