"""Verification fails closed: what no verifier can judge is never paid (retried, then
escalated), and honest work that filled the node's context is never called truncation."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from inference.llamacpp import LlamaCppEngine
from market.models import Node, Receipt, ReceiptEvent, utcnow
from market.verify import service, window
from market.verify.engine import VerifierNotConfigured, run_sync
from market.verify.models import VerificationTask
from tests.verification.conftest import make_settings, serve_job


def _state(world, receipt_id: str) -> str:
    with world.sessions() as s:
        return s.get(Receipt, receipt_id).state


def _claim_all(world, settings, now) -> list[str]:
    with world.sessions.begin() as s:
        window.decide_sampling(s, settings, now=now)
    with world.sessions.begin() as s:
        return window.claim_for_verification(s, settings, now=now)


def test_a_context_full_generation_is_honest(world, honest_engine, db_url, tmp_path: Path) -> None:
    """A node whose context fills before max_tokens ends with 'length' short of it. That
    is honest: the verifier must not slash it as truncation."""
    small = LlamaCppEngine(n_ctx=48, n_threads=2)
    run_sync(small.start())
    try:
        node_id, keypair = world.add_node(small)
        body = {"messages": [{"role": "user", "content": "Write a long story about a cat."}],
                "max_tokens": 200, "temperature": 0}
        served = serve_job(world, node_id, keypair, small, body)
    finally:
        run_sync(small.close())
    receipt = served.receipt.body
    assert served.finish_reason == "length"
    assert receipt.completion_tokens < 200
    assert receipt.prompt_tokens + receipt.completion_tokens == 48
    settings = make_settings(db_url, tmp_path)
    with world.sessions() as s:
        rid = s.execute(select(Receipt.id).where(Receipt.job_id == served.job_id)).scalar_one()
        inp = window.load_input(s, rid)
    outcome, evidence, reason = service.judge_receipt(
        inp, settings, engine_for=lambda _model, _settings: honest_engine)
    assert outcome == "honest", (reason, evidence)


def test_an_unverifiable_sampled_receipt_is_retried_escalated_and_never_paid(
    world, honest_engine, db_url, tmp_path: Path
) -> None:
    settings = make_settings(db_url, tmp_path,
                             verify__first_jobs=20, verify__max_attempts=3, verify__retry_s=10,
                             verify__challenge_window_s=60)
    node_id, keypair = world.add_node(honest_engine, reputation=0.5)
    served = serve_job(world, node_id, keypair, honest_engine,
                       {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                        "temperature": 0}, window_s=60)
    with world.sessions() as s:
        rid = s.execute(select(Receipt.id).where(Receipt.job_id == served.job_id)).scalar_one()

    def no_verifier(model_id: str, _settings) -> None:
        raise VerifierNotConfigured(f"no verifier serves {model_id}")

    now = utcnow()
    verifiers, backoffs = [], []
    for attempt in range(1, 4):
        claimed = _claim_all(world, settings, now)
        assert claimed == [rid], attempt
        assert service.verify(world.sessions, rid, settings, engine_for=no_verifier) == \
            "unavailable"
        with world.sessions() as s:
            verifiers.append(s.get(Receipt, rid).verification["verifier"])
            not_before = s.get(VerificationTask, rid).not_before
        # the window closing changes nothing: a sampled receipt is paid on a verdict only
        with world.sessions.begin() as s:
            assert window.close_expired_windows(s, settings,
                                                    now=now + timedelta(hours=2)) == []
        if attempt < 3:
            # not tried again at once: a growing backoff before the next verifier takes it
            backoffs.append((not_before - utcnow()).total_seconds())
            assert _claim_all(world, settings, not_before - timedelta(seconds=1)) == []
            now = not_before
    assert 9 < backoffs[0] <= 10 and 19 < backoffs[1] <= 20
    assert _state(world, rid) == "escalated"
    assert _claim_all(world, settings, now + timedelta(days=1)) == []
    with world.sessions() as s:
        node = s.get(Node, node_id)
        assert node.reputation == 0.5  # unverified work earns no reputation
        assert node.earned_settled == 0 and node.earned_pending > 0
        task = s.get(VerificationTask, rid)
        assert (task.attempts, task.outcome) == (3, "unavailable")
        events = [e.to_state for e in s.execute(
            select(ReceiptEvent).where(ReceiptEvent.receipt_id == rid)
            .order_by(ReceiptEvent.id)).scalars()]
    assert events == ["pending"] + ["verifying", "pending"] * 2 + ["verifying", "escalated"]
    assert all(verifiers)

    # the operator fixes the verifier and re-queues it: it is judged, and paid, now
    with world.sessions.begin() as s:
        assert window.requeue(s, rid)
    assert _claim_all(world, settings, now) == [rid]
    assert service.verify(world.sessions, rid, settings,
                          engine_for=lambda _m, _s: honest_engine) == "honest"
    with world.sessions() as s:
        assert s.get(Receipt, rid).state == "settled"
        assert s.get(Node, node_id).earned_settled > 0
