"""Fixtures for verification tests: a migrated database, the real llama.cpp engine,
cheating engines, and a helper that serves a job the way a node does (real
generation, real signed receipt) and stores it the way the market does
(``billing.open_job`` + ``billing.finalize_job``).

Engines are driven on the verifier's own event loop (``engine.run_sync``), the same
one the verification code uses, so one loaded model serves both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from sqlalchemy.orm import Session, sessionmaker

from inference.base import Engine
from inference.convert import generation_request
from inference.sampler import SAMPLER
from market.db import sync_session_factory
from market.migrate import upgrade
from market.models import Job, Node, NodeModel, new_id
from market.money import billing
from market.money.accounts import create_account
from market.settings import MarketSettings, nested
from market.verify.engine import run_sync
from node_agent.receipts import build_receipt
from protocol.receipt import SignedReceipt
from tests.verification import workload

PRICE_IN = 2_000_000  # base units per 1M tokens
PRICE_OUT = 8_000_000


@pytest.fixture(scope="session")
def honest_engine() -> Iterator[Engine]:
    from inference.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(n_threads=2)
    run_sync(engine.start())
    yield engine
    run_sync(engine.close())


@pytest.fixture(scope="session")
def pruned_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.verification.cheaters import pruned_gguf

    return pruned_gguf(20, tmp_path_factory.mktemp("models") / "smollm2-pruned20.gguf")


@pytest.fixture(scope="session")
def different_model_engine(pruned_model: Path, honest_engine: Engine) -> Iterator[Engine]:
    from tests.verification.cheaters import DifferentModelEngine

    engine = DifferentModelEngine(pruned_model, honest_engine)  # type: ignore[arg-type]
    run_sync(engine.start())
    yield engine
    run_sync(engine.inner.close())


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/market.db"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database on SQLite, then on PostgreSQL (a fresh database per test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/market.db"
        upgrade(url)
        yield url
        return
    import secrets

    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(request.getfixturevalue("postgres_url"))
    name = f"aidp_verify_{secrets.token_hex(4)}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = base.set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    from market.db import make_sync_engine

    make_sync_engine(url).dispose()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def sessions(db_url: str) -> sessionmaker[Session]:
    return sync_session_factory(db_url)


def make_settings(db_url: str, tmp_path: Path, **overrides: Any) -> MarketSettings:
    values: dict[str, Any] = {
        "db__url": db_url,
        "data_dir": tmp_path,
        "broker__url": f"sqla+sqlite:///{tmp_path}/broker.db",
        "verify__challenge_window_s": 3600.0,
        "verify__first_jobs": 20,
    }
    values.update(overrides)
    return MarketSettings(**nested(values))


@dataclass
class World:
    sessions: sessionmaker[Session]
    account_id: str

    def add_node(self, engine: Engine, *, stake: int = 1_000_000, reputation: float = 0.5,
                 sha256: str | None = None) -> tuple[str, Keypair]:
        keypair = Keypair()
        with self.sessions.begin() as session:
            node = Node(pubkey=str(keypair.pubkey()), price_in=PRICE_IN, price_out=PRICE_OUT,
                        stake=stake, reputation=reputation, max_concurrency=1)
            session.add(node)
            session.flush()
            session.add(NodeModel(node_id=node.id, model_id=engine.model.id,
                                  sha256=sha256 or engine.model.sha256, engine=engine.name,
                                  context_length=engine.model.context_length))
            node_id = node.id
        return node_id, keypair

    def balance(self) -> int:
        from market.models import Account

        with self.sessions() as session:
            account = session.get(Account, self.account_id)
            assert account is not None
            return account.balance

    def node(self, node_id: str) -> Node:
        with self.sessions() as session:
            node = session.get(Node, node_id)
            assert node is not None
            return node


@pytest.fixture()
def world(sessions: sessionmaker[Session]) -> World:
    with sessions.begin() as session:
        account = create_account(session, "buyer")
        account_id = account.id
        billing.credit_account(session, account_id, 10**12, "test-funding")
    return World(sessions=sessions, account_id=account_id)


@dataclass
class Served:
    job_id: str
    receipt: SignedReceipt
    text: str
    finish_reason: str


def generate(engine: Engine, kind: str, body: dict[str, Any],
             continuation_token_ids: list[int] | None = None
             ) -> tuple[list[int], str, str, int, bytes]:
    """Run ``engine`` on an OpenAI body: (token ids, text, finish_reason, prompt tokens,
    fingerprint rows)."""
    done = workload.generate(engine, kind, body, continuation_token_ids)
    return done.token_ids, done.text, done.finish_reason, done.prompt_tokens, done.fingerprint


def serve_job(world: World, node_id: str, keypair: Keypair, engine: Engine, body: dict[str, Any],
              kind: str = "chat", window_s: float = 3600.0,
              continuation_token_ids: list[int] | None = None,
              cancelled_after: int | None = None, sampler: str | None = SAMPLER) -> Served:
    """Serve one job as a node would and store it as the market does (``sampler``: the
    job's sampler column; None stores a job from before the protocol fixed one). With
    ``continuation_token_ids`` the node continues another node's output (a failover):
    ``body`` then carries the remaining ``max_tokens``. With ``cancelled_after`` the
    market cancels the job after that many tokens (its buyer left)."""
    import time

    body = {"model": engine.model.id, **body}
    started = time.time()
    produce = body if cancelled_after is None else {**body, "max_tokens": cancelled_after}
    ids, text, finish, prompt_tokens, rows = generate(engine, kind, produce,
                                                      continuation_token_ids)
    if cancelled_after is not None:
        finish = "cancelled"
    request = generation_request(kind, body, continuation_token_ids)
    signed = build_receipt(
        keypair=keypair, job_id="", market_id="market.example", engine=engine, request=request,
        output_text=text,
        output_token_ids=ids, fingerprint=rows, prompt_tokens=prompt_tokens, started_at=started,
        finished_at=time.time(),
    )
    earning = billing.node_cost(prompt_tokens, len(ids), PRICE_IN, PRICE_OUT)
    fee = billing.market_fee(earning, 1000)
    with world.sessions.begin() as session:
        job = Job(id=new_id("job"), account_id=world.account_id, model=engine.model.id, kind=kind,
                  request=request.job.model_dump(mode="json"), sampler=sampler,
                  hold_amount=billing.worst_case_hold(prompt_tokens, body.get("max_tokens", 256),
                                                      PRICE_IN, PRICE_OUT, 1000))
        billing.open_job(session, job)
        session.flush()
        job_id = job.id
    # The receipt names the job: sign it now that the id exists.
    signed = build_receipt(
        keypair=keypair, job_id=job_id, market_id="market.example", engine=engine,
        request=request, output_text=text,
        output_token_ids=ids, fingerprint=rows, prompt_tokens=prompt_tokens,
        started_at=signed.body.started_at,
        finished_at=signed.body.finished_at,
    )
    outcome = billing.Outcome(
        status="completed" if cancelled_after is None else "cancelled", prompt_tokens=prompt_tokens, completion_tokens=len(ids),
        finish_reason=finish,
        segments=[billing.Segment(
            node_id=node_id, seq=0, signed_receipt=signed.model_dump(mode="json"),
            receipt_hash=signed.receipt_hash, signature=signed.signature, output_text=text,
            prompt_tokens=prompt_tokens, completion_tokens=len(ids), node_earning=earning,
            fee=fee, continuation_token_ids=list(continuation_token_ids or []),
        )],
    )
    with world.sessions.begin() as session:
        assert billing.finalize_job(session, job_id, outcome, challenge_window_s=window_s)
    return Served(job_id=job_id, receipt=signed, text=text, finish_reason=finish)


def redis_test_url(base: str) -> str:
    """Database 15 of the test Redis server (flushed by the tests that use it)."""
    head, _, tail = base.rstrip("/").rpartition("/")
    if tail.isdigit():
        return f"{head}/15"
    return base.rstrip("/") + "/15"


def worker_env(settings: MarketSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AIDP_DB__URL": settings.db.url,
        "AIDP_BROKER__URL": settings.broker.url,
        "AIDP_DATA_DIR": str(settings.data_dir),
        "AIDP_VERIFY__CHALLENGE_WINDOW_S": str(settings.verify.challenge_window_s),
        "AIDP_VERIFY__FIRST_JOBS": str(settings.verify.first_jobs),
        "AIDP_VERIFY__SAMPLE_RATE": str(settings.verify.sample_rate),
        "AIDP_VERIFY__SCAN_INTERVAL_S": str(settings.verify.scan_interval_s),
        "AIDP_VERIFY__SUSPEND_AFTER_FRAUDS": str(settings.verify.suspend_after_frauds),
        "AIDP_VERIFY__THREADS": "2",
    })
    return env
