"""A real Celery worker (subprocess, embedded beat) on the SQLite and the Redis broker.

Jobs served by an honest node settle (first jobs verified, later ones at window
close); a cheating node's job is slashed and its buyer refunded; a node that cheats
twice is suspended.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from market.models import Receipt
from tests.support.net import stop_process
from tests.verification.cheaters import TruncatingEngine
from tests.verification.conftest import World, make_settings, redis_test_url, serve_job, worker_env

BODY = {"messages": [{"role": "user", "content": "Name two planets."}], "max_tokens": 16,
        "temperature": 0}


@pytest.fixture(params=["sqlite", "redis"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqla+sqlite:///{tmp_path}/broker.db"
    url = redis_test_url(request.getfixturevalue("redis_url"))
    import redis

    redis.Redis.from_url(url).flushdb()
    return url


def _wait_final(world: World, job_ids: list[str], timeout: float, proc: subprocess.Popen) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "celery worker exited"
        with world.sessions() as session:
            rows = session.execute(
                select(Receipt.job_id, Receipt.state).where(Receipt.job_id.in_(job_ids))
            ).all()
        states = dict(rows)
        if len(states) == len(job_ids) and all(s in ("settled", "slashed") for s in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"receipts not final after {timeout}s: {states}")


def test_worker_settles_and_slashes(world: World, db_url: str, tmp_path: Path, broker_url: str,
                                    honest_engine) -> None:
    settings = make_settings(
        db_url, tmp_path, broker__url=broker_url, verify__first_jobs=1, verify__sample_rate=0.0,
        verify__scan_interval_s=0.5, verify__suspend_after_frauds=2, verify__challenge_window_s=2.0,
    )
    honest_id, honest_kp = world.add_node(honest_engine, reputation=0.9)
    first = serve_job(world, honest_id, honest_kp, honest_engine, BODY, window_s=3600)
    second = serve_job(world, honest_id, honest_kp, honest_engine,
                       {**BODY, "messages": [{"role": "user", "content": "Name a fruit."}]},
                       window_s=2.0)
    cheater = TruncatingEngine(honest_engine, fraction=0.3)
    cheater.model = honest_engine.model
    cheat_id, cheat_kp = world.add_node(honest_engine, stake=50)
    cheat1 = serve_job(world, cheat_id, cheat_kp, cheater, BODY)
    # The cheater's second job is no longer a "first job": challenge it as its buyer would.
    cheat2 = serve_job(world, cheat_id, cheat_kp, cheater,
                       {**BODY, "messages": [{"role": "user", "content": "Name a fruit."}]})
    with world.sessions.begin() as session:
        from market.verify.window import request_challenge

        r = session.execute(select(Receipt).where(Receipt.job_id == cheat2.job_id)).scalar_one()
        assert request_challenge(session, r)
    balance_before = world.balance()

    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "market.worker.celery_app", "worker", "-B",
         "-P", "solo", "-c", "1", "--loglevel=info", "--without-gossip", "--without-mingle",
         f"--schedule={tmp_path}/celerybeat-schedule"],
        env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        states = _wait_final(world, [first.job_id, second.job_id, cheat1.job_id, cheat2.job_id],
                             120, proc)
    except AssertionError:
        log.flush()
        print((tmp_path / "worker.log").read_text()[-4000:])
        raise
    finally:
        stop_process(proc, 15)
        log.close()
    assert states[first.job_id] == "settled"
    assert states[second.job_id] == "settled"
    assert states[cheat1.job_id] == "slashed"
    assert states[cheat2.job_id] == "slashed"
    with world.sessions() as session:
        receipts = {r.job_id: r for r in session.execute(select(Receipt)).scalars()}
    assert receipts[first.job_id].state_reason == "verified honest"
    assert receipts[second.job_id].state_reason == "challenge window closed"
    honest = world.node(honest_id)
    assert honest.earned_settled == (receipts[first.job_id].node_earning
                                     + receipts[second.job_id].node_earning)
    cheat = world.node(cheat_id)
    assert cheat.fraud_count == 2 and cheat.suspended
    assert cheat.stake == 0  # 10 x cost, capped by the 50 staked
    refunds = receipts[cheat1.job_id].cost + receipts[cheat2.job_id].cost
    assert world.balance() == balance_before + refunds
    assert "truncated" in receipts[cheat2.job_id].state_reason
