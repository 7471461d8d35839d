"""Segments that are not a whole generation are judged fairly.

A failover segment: a node that dies mid-stream leaves no receipt, so the tokens it
streamed appear in no other receipt; the node that continued from them signed only
their digest. The prefix is stored with the receipt so the verifier can replay it.

A cancelled segment: the market stopped the node when its buyer left, so the output
ends anywhere and must not be judged as a natural stop.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update

from inference.base import Engine
from market.models import Receipt
from market.verify import window
from market.verify.service import judge_receipt
from tests.verification.conftest import Served, World, generate, make_settings, serve_job

BODY = {"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0}
FULL_TOKENS = 24
DEAD_AFTER = 8  # tokens the first node streamed before it died


def _input(world: World, job_id: str) -> window.VerificationInput:
    """What the verifier loads for the job's (only) receipt."""
    with world.sessions() as session:
        receipt_id = session.execute(
            select(Receipt.id).where(Receipt.job_id == job_id)).scalar_one()
        return window.load_input(session, receipt_id)


def _serve_continuation(world: World, engine: Engine) -> tuple[Served, list[int]]:
    """A node continues the first DEAD_AFTER tokens of a greedy run another node began:
    (its stored job, the ids of the whole run)."""
    node_id, keypair = world.add_node(engine)
    full_ids, _, _, _, _ = generate(engine, "chat", {**BODY, "max_tokens": FULL_TOKENS})
    served = serve_job(world, node_id, keypair, engine,
                       {**BODY, "max_tokens": FULL_TOKENS - DEAD_AFTER},
                       continuation_token_ids=full_ids[:DEAD_AFTER])
    return served, full_ids


def _set_prefix(world: World, job_id: str, prefix: list[int] | None) -> None:
    with world.sessions.begin() as session:
        session.execute(update(Receipt).where(Receipt.job_id == job_id)
                        .values(continuation_token_ids=prefix))


def test_continued_segment_is_judged_from_its_stored_prefix(
    world: World, db_url: str, tmp_path: Path, honest_engine
) -> None:
    settings = make_settings(db_url, tmp_path)
    served, full_ids = _serve_continuation(world, honest_engine)
    prefix = full_ids[:DEAD_AFTER]
    assert served.receipt.output_token_ids == full_ids[DEAD_AFTER:]  # greedy: same run

    inp = _input(world, served.job_id)
    assert inp.continuation_token_ids == prefix
    outcome, evidence, reason = judge_receipt(inp, settings, lambda *_: honest_engine)
    assert outcome == "honest", (reason, evidence)

    # Stored without its prefix (as before it was kept), or with one that is not what the
    # node signed (the prefix is market data, not signed): unjudgeable, never a fraud.
    for stored in (None, prefix[:-1]):
        _set_prefix(world, served.job_id, stored)
        outcome, _, reason = judge_receipt(_input(world, served.job_id), settings,
                                           lambda *_: honest_engine)
        assert outcome == "unavailable" and "continuation prefix" in reason, stored


def test_cancelled_segment_is_not_judged_as_a_stop(
    world: World, db_url: str, tmp_path: Path, honest_engine
) -> None:
    """The market cancelled the node after a few tokens (its buyer left): the output ends
    short of ``max_tokens`` with no end-of-generation, which is honest here and would be
    a false natural stop otherwise."""
    settings = make_settings(db_url, tmp_path)
    node_id, keypair = world.add_node(honest_engine)
    served = serve_job(world, node_id, keypair, honest_engine,
                       {**BODY, "max_tokens": FULL_TOKENS}, cancelled_after=DEAD_AFTER)
    assert len(served.receipt.output_token_ids) == DEAD_AFTER
    assert served.receipt.body.sampling.max_tokens == FULL_TOKENS
    inp = _input(world, served.job_id)
    assert inp.finish_reason == "cancelled" and inp.is_last_segment
    outcome, evidence, reason = judge_receipt(inp, settings, lambda *_: honest_engine)
    assert outcome == "honest", (reason, evidence)
    assert evidence["stats"]["stop_checked"] is False

    inp.finish_reason = "stop"  # the same tokens claimed as a natural end
    outcome, evidence, reason = judge_receipt(inp, settings, lambda *_: honest_engine)
    assert outcome == "fraud" and "stop" in reason, (reason, evidence)
