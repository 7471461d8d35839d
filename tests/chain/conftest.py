"""Fixtures for the market's chain settlement: a migrated market DB, a ledger (in-process
LiteSVM, or a real ``aidp-ledger`` server through solana-py), ``aidp-market chain init``
run against both, and helpers that put accounts, nodes and receipts in the DB the way the
market does."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy.orm import Session, sessionmaker

from chain import aidp
from chain.ledger.base import Ledger
from chain.ledger.open import open_ledger
from chain.localnet.cli import LedgerProcess as LedgerServer
from market.db import sync_session_factory
from market.migrate import upgrade
from market.models import Account, Job, Node, Receipt, utcnow
from market.onchain import bootstrap, service
from market.onchain.runtime import ChainRuntime, load_identity
from market.settings import MarketSettings, nested
from tests.support.db import postgres_schema
from tests.support.program import program_path


def registration(wallet: Keypair, account_id: str, market_id: str,
                 signed_at: int | None = None) -> dict[str, Any]:
    """The body a wallet owner POSTs to /v1/chain/allowance (signed by the wallet)."""
    import time

    from protocol.keys import ALLOWANCE_DOMAIN, allowance_message, sign

    signed_at = int(time.time()) if signed_at is None else signed_at
    message = allowance_message(market_id, account_id, str(wallet.pubkey()), signed_at)
    return {"wallet": str(wallet.pubkey()), "signed_at": signed_at,
            "signature": sign(wallet, ALLOWANCE_DOMAIN, message)}


def register_allowance(session: Session, wallet: Keypair, account_id: str,
                       market_id: str = "market.example", signed_at: int | None = None) -> Any:
    """Register ``wallet``'s allowance for ``account_id`` as its owner would (signed)."""
    from market.onchain import allowance

    body = registration(wallet, account_id, market_id, signed_at)
    return allowance.register(session, account_id, body["wallet"], market_id=market_id,
                              signed_at=body["signed_at"], signature=body["signature"])


@pytest.fixture(scope="session")
def chain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerServer]:
    server = LedgerServer(tmp_path_factory.mktemp("chain-ledger")).start()
    yield server
    server.stop()


def _sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/market.db"
    upgrade(url)
    return url


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return _sqlite(tmp_path)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite, then PostgreSQL in a fresh schema (for the DB-heavy tests)."""
    if request.param == "sqlite":
        yield _sqlite(tmp_path)
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), "chain") as url:
        upgrade(url)
        yield url


@dataclass
class World:
    """A market with chain settlement initialized on ``ledger``."""

    settings: MarketSettings
    sessions: sessionmaker[Session]
    ledger: Ledger
    rt: ChainRuntime

    @property
    def cfg(self) -> aidp.ChainConfig:
        return self.rt.cfg

    async def step(self, *names: str) -> dict[str, Any]:
        return await service.run_steps(self.settings, self.sessions, list(names),
                                       ledger=self.ledger)

    async def wallet(self, tokens: int = 0) -> Keypair:
        kp = Keypair()
        await aidp.fund_wallet(self.ledger, self.cfg, self.rt.market, kp.pubkey(),
                                     tokens=tokens)
        return kp

    async def tokens(self, owner: Pubkey | str) -> int:
        owner = owner if isinstance(owner, Pubkey) else Pubkey.from_string(owner)
        return await self.ledger.token_balance(self.cfg.ata(owner))

    async def fund_deposit_account(self, amount: int) -> None:
        """Back off-chain credit with tokens, the way `chain init` does on local chains."""
        from chain import spl

        await self.ledger.execute(
            [spl.mint_to_checked(self.cfg.mint_pk, self.cfg.deposit_pk, self.cfg.market_pk,
                                 amount, self.cfg.decimals)], self.rt.market)
        from market.onchain import transfers

        with self.sessions.begin() as s:
            transfers.plan(s, kind="mint", key=f"mint:test-{secrets.token_hex(4)}",
                           amount=amount, from_address=None, to_address=self.cfg.deposit,
                           memo=None, state="confirmed")

    def account(self, balance: int = 0) -> str:
        with self.sessions.begin() as s:
            acct = Account(name="buyer", balance=balance, held=0)
            s.add(acct)
            s.flush()
            return acct.id

    async def node(self, stake: int = 0) -> tuple[str, Keypair]:
        """A node; with ``stake``: that much AIDP bonded in its vault of the program, by
        the operator alone, as ``aidp-node stake`` does."""
        kp = Keypair()
        if stake:
            await aidp.fund_wallet(self.ledger, self.cfg, self.rt.market, kp.pubkey(),
                                   tokens=stake)
            await self.ledger.execute(
                aidp.stake_instructions(self.cfg, kp.pubkey(), stake, register=True), kp)
        with self.sessions.begin() as s:
            node = Node(pubkey=str(kp.pubkey()), price_in=1_000_000, price_out=1_000_000,
                        stake=stake)
            s.add(node)
            s.flush()
            return node.id, kp

    def receipt(self, node_id: str, account_id: str, *, earning: int, fee: int,
                state: str = "settled", signer: Keypair | None = None) -> Receipt:
        """A receipt in ``state``; with ``signer``: signed by that node key the way a node
        signs (what a case on chain checks)."""
        from protocol.keys import RECEIPT_DOMAIN, sign

        now = utcnow()
        with self.sessions.begin() as s:
            job = Job(account_id=account_id, model="m", kind="chat", request={},
                      status="completed", charged_amount=earning + fee, fee_amount=fee)
            s.add(job)
            s.flush()
            rhash = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
            r = Receipt(job_id=job.id, node_id=node_id, seq=0, receipt={}, receipt_hash=rhash,
                        signature=sign(signer, RECEIPT_DOMAIN, bytes.fromhex(rhash))
                        if signer else "sig", cost=earning + fee, node_earning=earning, fee=fee,
                        state=state, window_closes_at=now - timedelta(seconds=1))
            s.add(r)
            s.flush()
            s.expunge(r)
            return r


def make_settings(tmp_path: Path, db_url: str, **overrides: Any) -> MarketSettings:
    values: dict[str, Any] = {
        "db__url": db_url,
        "data_dir": tmp_path / "data",
        "broker__url": f"sqla+sqlite:///{tmp_path}/broker.db",
        "chain__demo_wallets": 0,
        "chain__demo_tokens": 0,
        "chain__confirm_timeout_s": 20.0,
        "chain__program_path": program_path(),
    }
    values.update(overrides)
    return MarketSettings(**nested(values))


async def make_world(settings: MarketSettings, ledger: Ledger) -> World:
    sessions = sync_session_factory(settings.db.url)
    await bootstrap.init(settings, sessions, ledger=ledger)
    cfg, market, verifiers = load_identity(settings)
    return World(settings, sessions, ledger,
                 ChainRuntime(settings, cfg, market, verifiers, ledger))


@pytest.fixture(params=["inprocess", "rpc"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def open_backend(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    if backend == "inprocess":
        return open_ledger("inprocess", tmp_path / "data")
    return open_ledger(request.getfixturevalue("chain_server").url)


@pytest.fixture
async def world(backend: str, request: pytest.FixtureRequest, tmp_path: Path,
                db_url: str) -> Any:
    ledger = open_backend(backend, request, tmp_path)
    try:
        yield await make_world(make_settings(tmp_path, db_url), ledger)
    finally:
        await ledger.close()


@pytest.fixture
async def db_world(request: pytest.FixtureRequest, tmp_path: Path, any_db_url: str) -> Any:
    """In-process chain, SQLite and PostgreSQL."""
    ledger = open_ledger("memory")
    try:
        yield await make_world(make_settings(tmp_path, any_db_url), ledger)
    finally:
        await ledger.close()


