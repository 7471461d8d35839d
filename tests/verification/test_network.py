"""The whole path: market server (uvicorn), real nodes (NodeLink + llama.cpp), the
``openai`` SDK as buyer, and a real Celery worker verifying on the SQLite broker.

An honest node's job settles; a node that truncates its work (claims a natural stop
after 30% of the tokens) is slashed, its buyer refunded, and ``GET /v1/jobs/{id}``
shows the evidence.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from solders.keypair import Keypair
from sqlalchemy import select, update

from market.app import create_app
from market.models import Account, LedgerEntry, Node, Receipt
from market.money import billing
from market.money.accounts import create_account, issue_key
from node_agent.link import NodeLink
from tests.support.net import free_port, stop_process
from tests.verification.cheaters import TruncatingEngine
from tests.verification.conftest import make_settings, worker_env

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PRICE = (2_000_000, 8_000_000)


class Loop:
    """An asyncio loop in a thread, for node links."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_network_honest_settles_cheater_slashed(tmp_path: Path, sessions, db_url) -> None:
    port = free_port()
    settings = make_settings(db_url, tmp_path, verify__first_jobs=20,
                             verify__scan_interval_s=0.5, port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    server_thread = threading.Thread(target=server.run, daemon=True)
    server_thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "market did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"

    with sessions.begin() as session:
        account = create_account(session, "buyer")
        session.flush()
        billing.credit_account(session, account.id, 10**10, "e2e")
        _, key = issue_key(session, account.id)
        account_id = account.id
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)

    loop = Loop()
    worker = None
    try:
        from inference.llamacpp import LlamaCppEngine

        async def make_engine() -> LlamaCppEngine:
            engine = LlamaCppEngine(n_threads=2)
            await engine.start()
            return engine

        engine = loop.call(make_engine())

        def serve_with(node_engine: Any, request: dict[str, Any]) -> tuple[str, str]:
            link = NodeLink(base, Keypair(), node_engine, price=PRICE)
            run = loop.spawn(link.run())
            loop.call(link.wait_ready(30))
            try:
                if request.get("stream"):
                    text = "".join(
                        (c.choices[0].delta.content or "") if c.choices else ""
                        for c in client.chat.completions.create(**request)
                    )
                    job_id = None
                else:
                    response = client.chat.completions.create(**request)
                    text = response.choices[0].message.content or ""
                    job_id = response.id.removeprefix("chatcmpl-")
            finally:
                loop.call(link.stop())
                run.result(10)
            if job_id is None:
                with sessions() as session:
                    job_id = session.execute(
                        select(Receipt.job_id).join(Node, Node.id == Receipt.node_id)
                        .where(Node.pubkey == link.pubkey)
                    ).scalar_one()
            return job_id, link.pubkey

        request = {"model": MODEL, "max_tokens": 20, "temperature": 0,
                   "messages": [{"role": "user", "content": "Name three animals."}]}
        honest_job, _ = serve_with(engine, request)
        cheater = TruncatingEngine(engine, fraction=0.3)
        cheater.model = engine.model
        cheat_job, cheat_pubkey = serve_with(cheater, {**request, "stream": True})

        with sessions.begin() as session:
            session.execute(update(Node).where(Node.pubkey == cheat_pubkey).values(stake=10**6))
            balance_before = session.get(Account, account_id).balance

        log = open(tmp_path / "worker.log", "w")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "market.worker.celery_app", "worker", "-B",
             "-P", "solo", "--loglevel=info", "--without-gossip", "--without-mingle",
             f"--schedule={tmp_path}/celerybeat-schedule"],
            env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        deadline = time.monotonic() + 120
        while True:
            with sessions() as session:
                states = dict(session.execute(
                    select(Receipt.job_id, Receipt.state)
                    .where(Receipt.job_id.in_([honest_job, cheat_job]))).all())
            if set(states.values()) <= {"settled", "slashed"} and len(states) == 2:
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (states, (tmp_path / "worker.log").read_text()[-3000:])
            time.sleep(0.5)
        assert states == {honest_job: "settled", cheat_job: "slashed"}

        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
            honest_view = http.get(f"/v1/jobs/{honest_job}").json()
            cheat_view = http.get(f"/v1/jobs/{cheat_job}").json()
        assert honest_view["verification_state"] == "settled"
        assert honest_view["receipts"][0]["verification"]["outcome"] == "honest"
        assert cheat_view["verification_state"] == "slashed"
        evidence = cheat_view["receipts"][0]["verification"]
        assert any("truncated" in r for r in evidence["reasons"]), evidence
        cost = cheat_view["receipts"][0]["cost"]
        assert cost > 0
        assert evidence["slash"] == {"amount": 10 * cost, "refund": cost, "fraud_count": 1,
                                     "suspended": False}
        with sessions() as session:
            assert session.get(Account, account_id).balance == balance_before + cost
            node = session.execute(select(Node).where(Node.pubkey == cheat_pubkey)).scalar_one()
            assert node.stake == 10**6 - 10 * cost
            assert session.execute(select(LedgerEntry.amount).where(
                LedgerEntry.kind == "refund")).scalar_one() == cost
    finally:
        if worker is not None:
            stop_process(worker, 15)
        loop.close()
        server.should_exit = True
        server_thread.join(10)
