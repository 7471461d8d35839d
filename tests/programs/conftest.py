"""Fixtures for the on-chain layer: every test that takes ``ledger`` runs twice, on the
in-process LiteSVM backend and through a real ``aidp-ledger`` server with solana-py."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from programs import settlement
from programs.ledger import Ledger
from programs.ledgers import open_ledger
from programs.settlement import ChainConfig

REPO = Path(__file__).resolve().parents[2]


class LedgerServer:
    """``aidp-ledger serve`` in a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.ready_line = ""

    def start(self, timeout: float = 30.0) -> LedgerServer:
        cmd = [
            sys.executable,
            "-m",
            "programs.cli",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(self.data_dir),
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            if not sel.select(timeout=deadline - time.monotonic()):
                break
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("aidp-ledger ready "):
                self.ready_line = line.strip()
                fields = dict(f.split("=", 1) for f in self.ready_line.split()[2:])
                self.url = fields["url"]
                return self
        self.stop()
        raise RuntimeError("aidp-ledger did not become ready:\n" + "".join(seen))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def ledger_server(tmp_path_factory: pytest.TempPathFactory):
    server = LedgerServer(tmp_path_factory.mktemp("aidp-ledger")).start()
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
        await settlement.fund_wallet(
            self.ledger, self.cfg, self.key, kp.pubkey(), lamports=lamports, tokens=tokens
        )
        return kp

    async def tokens(self, owner: Pubkey) -> int:
        return await self.ledger.token_balance(self.cfg.ata(owner))


@pytest.fixture
async def market(ledger: Ledger) -> Market:
    key = Keypair()
    cfg = await settlement.bootstrap(ledger, key, decimals=6)
    return Market(ledger, key, cfg)
