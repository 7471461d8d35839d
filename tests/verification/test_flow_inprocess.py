"""Challenge-window flow in-process (no broker), on SQLite and PostgreSQL: honest
work settles, cheats are slashed, re-running changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from market.db import sync_session_factory
from market.models import LedgerEntry, Node, Receipt, ReceiptEvent
from market.verify import service
from tests.verification.cheaters import EditingEngine, TruncatingEngine
from tests.verification.conftest import World, make_settings, serve_job


@pytest.fixture()
def db_url(any_db_url: str) -> str:
    return any_db_url


@pytest.fixture()
def sessions(db_url: str):
    factory = sync_session_factory(db_url)
    yield factory
    factory.kw["bind"].dispose()


def _run_until_quiet(world: World, settings, rounds: int = 5) -> None:
    for _ in range(rounds):
        result = service.tick(world.sessions, settings)
        for rid in result.dispatched:
            service.verify(world.sessions, rid, settings)
        if not result.dispatched and not result.decided and not result.settled:
            break


def test_honest_settles_and_cheats_are_slashed(world: World, db_url: str, tmp_path: Path,
                                               honest_engine, different_model_engine) -> None:
    settings = make_settings(db_url, tmp_path, verify__first_jobs=20)
    honest_id, honest_kp = world.add_node(honest_engine)
    body = {"messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 24, "temperature": 0}
    honest = serve_job(world, honest_id, honest_kp, honest_engine, body)

    cheats = {}
    for label, engine in {
        "edit_text": EditingEngine(honest_engine, mode="text"),
        "edit_tokens": EditingEngine(honest_engine, mode="tokens"),
        "invalid_ids": EditingEngine(honest_engine, mode="invalid_ids"),
        "truncate": TruncatingEngine(honest_engine, fraction=0.4),
        "other_model": different_model_engine,
    }.items():
        if label != "other_model":
            engine.model = honest_engine.model
        node_id, kp = world.add_node(honest_engine, stake=1_000_000)
        cheats[label] = (node_id, serve_job(world, node_id, kp, engine, body))

    before = world.balance()
    _run_until_quiet(world, settings)

    with world.sessions() as session:
        r = session.execute(select(Receipt).where(Receipt.job_id == honest.job_id)).scalar_one()
        assert r.state == "settled", r.state_reason
        assert r.verification["outcome"] == "honest"
        honest_node = session.get(Node, honest_id)
        assert honest_node.earned_settled == r.node_earning
        assert honest_node.reputation > 0.5
        refunds = 0
        for label, (node_id, served) in cheats.items():
            r = session.execute(select(Receipt).where(Receipt.job_id == served.job_id)).scalar_one()
            assert r.state == "slashed", (label, r.state, r.state_reason, r.verification)
            assert r.verification["outcome"] == "fraud"
            assert r.verification["slash"]["amount"] == min(10 * r.cost, 1_000_000)
            node = session.get(Node, node_id)
            assert node.stake == 1_000_000 - r.verification["slash"]["amount"]
            assert node.fraud_count == 1 and node.reputation == 0.25
            assert node.earned_pending == 0 and node.earned_settled == 0
            refunds += r.cost
            events = session.execute(select(ReceiptEvent.to_state).where(
                ReceiptEvent.receipt_id == r.id).order_by(ReceiptEvent.id)).scalars().all()
            assert events == ["pending", "verifying", "slashed"]
            kinds = set(session.execute(select(LedgerEntry.kind).where(
                LedgerEntry.receipt_id == r.id)).scalars())
            assert {"refund", "slash", "forfeit"} <= kinds
    assert world.balance() == before + refunds
    # Re-running is a no-op (idempotent transitions and journal keys).
    _run_until_quiet(world, settings)
    assert world.balance() == before + refunds
    _independent_verifier_signs_only_what_it_reproduces(world, settings, honest, cheats)


def _independent_verifier_signs_only_what_it_reproduces(world, settings, honest, cheats):
    """A verifier on its own host (``sign-verdicts --reexecute``) judges each slashed
    receipt again before signing its verdict. A market that writes a slash for honest work
    (here: the honest receipt forged into ``slashed``) gets no signature for it."""
    from solders.keypair import Keypair

    from chain.aidp import ChainConfig
    from market.onchain.models import ChainVerdict
    from market.onchain.verdicts import sign_with

    with world.sessions.begin() as session:
        r = session.execute(select(Receipt).where(Receipt.job_id == honest.job_id)).scalar_one()
        r.state = "slashed"
        session.add(LedgerEntry(kind="slash", idempotency_key=f"slash:{r.id}", amount=500,
                                node_id=r.node_id, receipt_id=r.id))
        honest_receipt = r.id
    cfg = ChainConfig(mint=str(Keypair().pubkey()), decimals=6, market=str(Keypair().pubkey()),
                      deposit=str(Keypair().pubkey()), treasury=str(Keypair().pubkey()),
                      program=str(Keypair().pubkey()))

    def confirm(receipt_id: str) -> bool:
        return service.reproduces_fraud(world.sessions, receipt_id, settings)

    key = Keypair()
    assert sign_with(cfg, 10**15, key, world.sessions, confirm) == len(cheats)
    with world.sessions() as session:
        signed = set(session.execute(select(ChainVerdict.receipt_id)).scalars())
    assert honest_receipt not in signed and len(signed) == len(cheats)


def test_window_closes_unsampled_receipts(world: World, db_url: str, tmp_path: Path,
                                          honest_engine) -> None:
    settings = make_settings(db_url, tmp_path, verify__first_jobs=0, verify__sample_rate=0.0,
                             verify__low_reputation=0.0)
    node_id, kp = world.add_node(honest_engine)
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
            "temperature": 0}
    served = serve_job(world, node_id, kp, honest_engine, body, window_s=0.0)
    _run_until_quiet(world, settings)
    with world.sessions() as session:
        r = session.execute(select(Receipt).where(Receipt.job_id == served.job_id)).scalar_one()
        assert r.state == "settled" and r.state_reason == "challenge window closed"
        assert r.verification is None
    assert world.node(node_id).earned_settled == r.node_earning
    assert world.node(node_id).earned_pending == 0


def test_the_jobs_sampler_decides_the_exact_check(world: World, db_url: str, tmp_path: Path,
                                                  honest_engine, different_model_engine) -> None:
    """At temperature 1 a cheaper model is slashed through the stored job's sampler (the
    protocol's), token by token; an honest job is settled; a job stored from before the
    protocol fixed a sampler is judged by the statistical checks alone (never by a rule
    its node did not have to follow)."""
    settings = make_settings(db_url, tmp_path, verify__first_jobs=20)
    body = {"messages": [{"role": "user", "content": "Tell me a short story about a dragon."}],
            "max_tokens": 32, "temperature": 1.0, "top_p": 1.0, "seed": 5}
    honest_id, honest_kp = world.add_node(honest_engine)
    honest = serve_job(world, honest_id, honest_kp, honest_engine, body)
    cheat_id, cheat_kp = world.add_node(honest_engine, stake=1_000_000)
    cheat = serve_job(world, cheat_id, cheat_kp, different_model_engine, body)
    legacy_id, legacy_kp = world.add_node(honest_engine, stake=1_000_000)
    legacy = serve_job(world, legacy_id, legacy_kp, different_model_engine, body, sampler=None)
    _run_until_quiet(world, settings)
    with world.sessions() as session:
        def receipt(served):
            return session.execute(select(Receipt).where(Receipt.job_id == served.job_id)
                                   ).scalar_one()

        assert receipt(honest).state == "settled"
        assert receipt(honest).verification["stats"]["sampler_checked"] is True
        slashed = receipt(cheat)
        assert slashed.state == "slashed", slashed.verification
        reasons = [e["reason"] for e in slashed.verification["evidence"]]
        assert "sampler_not_followed" in reasons
        assert receipt(legacy).verification["stats"]["sampler_checked"] is False
