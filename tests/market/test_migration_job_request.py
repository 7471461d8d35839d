"""Migration 0007: stored OpenAI bodies become typed job requests with the same digest.

Rows are written as the market stored them before (the validated OpenAI body), the
database is upgraded, and each row must parse as ``protocol.job.JobRequest`` with the
sampling the market sent the node and the request digest the node signed, computed here
by the earlier algorithm and pinned by golden values. Rows that cannot keep their
digest, or are not bodies at all, stay exactly as they were.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from market.db import make_sync_engine
from market.migrate import alembic_config, upgrade
from market.models import UTCDateTime
from protocol.job import DEFAULT_MAX_TOKENS, JobRequest
from tests.support.db import postgres_schema

BEFORE = "0006_integrity"
REVISION = "0007_job_request"

_accounts = sa.table(
    "accounts", sa.column("id", sa.String()), sa.column("name", sa.String()),
    sa.column("balance", sa.BigInteger()), sa.column("held", sa.BigInteger()),
    sa.column("created_at", UTCDateTime()))
_jobs = sa.table(
    "jobs", sa.column("id", sa.String()), sa.column("account_id", sa.String()),
    sa.column("model", sa.String()), sa.column("kind", sa.String()),
    sa.column("request", sa.JSON()), sa.column("stream", sa.Boolean()),
    sa.column("status", sa.String()), sa.column("hold_amount", sa.BigInteger()),
    sa.column("charged_amount", sa.BigInteger()), sa.column("fee_amount", sa.BigInteger()),
    sa.column("prompt_tokens", sa.Integer()), sa.column("completion_tokens", sa.Integer()),
    sa.column("failovers", sa.Integer()), sa.column("created_at", UTCDateTime()))


# ---- the earlier digest, as protocol/canonical.py computed it -----------------------------


def old_request_digest(kind: str, body: dict[str, Any], continuation: Sequence[int] = ()
                       ) -> str:
    """``request_digest(kind, spec.input, continuation)`` of the earlier market and node:
    the body's messages reduced to role and content, or its prompt."""
    if kind == "chat":
        request_input: Any = [{"role": m.get("role"), "content": m.get("content")}
                              for m in body["messages"]]
    else:
        request_input = body["prompt"]
    value = {"kind": kind, "input": request_input, "continuation": list(continuation)}
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


# The digests receipts carry for these prompts (tests/protocol/test_job.py's vectors).
GOLDEN_CHAT = "aab6514bc52a74e589f09f9d112ae0e5386ac5829d6a1a898ba879e205fad15d"
GOLDEN_CHAT_CONTINUED = "c8b653a46622db4edc0578142ca16dbb8e1d5d95522f05766e2206e6924f531f"
GOLDEN_COMPLETION = "e76e0e97c4a8b9b5497f03091a043b328e1f75c59e9276c4ddd18f0446c195b5"

# ---- rows as the market stored them: body.model_dump(mode="json", exclude_none=True) ----

CONVERTED: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # job id: (kind, stored body, the sampling the market sent the node for it)
    "job_chat_min": ("chat", {
        "model": "m1", "stream": False, "n": 1,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi, café ☕"}],
    }, {"temperature": 1.0, "top_p": 1.0, "max_tokens": DEFAULT_MAX_TOKENS, "seed": None,
        "stop": []}),
    "job_chat_full": ("chat", {
        "model": "m1", "stream": True, "n": 1, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Count to 5", "name": "ann"}],
        # both given: the market sent max_completion_tokens
        "max_tokens": 50, "max_completion_tokens": 40,
        "temperature": 0, "top_p": 0.9, "seed": 7, "stop": "END", "user": "u-1",
        "max_price_per_mtok": 1000,
    }, {"temperature": 0.0, "top_p": 0.9, "max_tokens": 40, "seed": 7, "stop": ["END"]}),
    "job_chat_extra_keys": ("chat", {
        # a client's own "kind" and "sampling" fields (extra fields were kept): still a body
        "model": "m1", "stream": False, "n": 1, "kind": "x", "sampling": {"a": 1},
        "messages": [{"role": "user", "content": "Count to 5"}], "max_tokens": 3,
    }, {"temperature": 1.0, "top_p": 1.0, "max_tokens": 3, "seed": None, "stop": []}),
    "job_completion_min": ("completion", {
        "model": "m2", "stream": False, "n": 1, "prompt": "Once upon a time",
    }, {"temperature": 1.0, "top_p": 1.0, "max_tokens": DEFAULT_MAX_TOKENS, "seed": None,
        "stop": []}),
    "job_completion_full": ("completion", {
        "model": "m2", "stream": False, "n": 1, "prompt": "Once upon a time",
        "max_tokens": 12, "temperature": 0.7, "top_p": 1, "seed": -3, "stop": ["", "\n\n"],
    }, {"temperature": 0.7, "top_p": 1.0, "max_tokens": 12, "seed": -3, "stop": ["\n\n"]}),
}
GOLDEN = {"job_chat_min": GOLDEN_CHAT, "job_completion_min": GOLDEN_COMPLETION,
          "job_completion_full": GOLDEN_COMPLETION}

KEPT: dict[str, tuple[str, Any]] = {
    # not an object
    "job_bad_string": ("chat", "not a body"),
    # messages that are not a list
    "job_bad_messages": ("chat", {"model": "m1", "stream": False, "n": 1, "messages": "hi"}),
    # content parts: the old digest covered the list, a typed turn is plain text
    "job_bad_parts": ("chat", {"model": "m1", "stream": False, "n": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}]}]}),
    # a sampling field of the wrong type
    "job_bad_temperature": ("completion", {"model": "m2", "stream": False, "n": 1,
                                           "prompt": "p", "temperature": "hot"}),
    # a completion without its prompt
    "job_bad_prompt": ("completion", {"model": "m2", "stream": False, "n": 1}),
}

# written by the market after the upgrade: left alone
TYPED_ID = "job_typed"
TYPED = JobRequest.from_openai("chat", {"model": "m1", "seed": 1, "messages": [
    {"role": "user", "content": "Count to 5"}]}).model_dump(mode="json")


# ---- databases -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty database for each test, migrated by the test itself."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'market.db'}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url"), prefix="mig") as url:
        yield url


def _seed(url: str) -> sa.Engine:
    upgrade(url, BEFORE)
    engine = make_sync_engine(url)
    now = datetime.now(UTC)
    rows = [(job_id, kind, body) for job_id, (kind, body, _) in CONVERTED.items()]
    rows += [(job_id, kind, body) for job_id, (kind, body) in KEPT.items()]
    rows.append((TYPED_ID, "chat", TYPED))
    with engine.begin() as conn:
        conn.execute(sa.insert(_accounts).values(id="acct_1", name="a", balance=0, held=0,
                                                 created_at=now))
        conn.execute(sa.insert(_jobs), [
            {"id": job_id, "account_id": "acct_1", "kind": kind, "request": body,
             "model": body.get("model", "m") if isinstance(body, dict) else "m",
             "stream": bool(isinstance(body, dict) and body.get("stream")),
             "status": "succeeded", "hold_amount": 0, "charged_amount": 0, "fee_amount": 0,
             "prompt_tokens": 0, "completion_tokens": 0, "failovers": 0, "created_at": now}
            for job_id, kind, body in rows])
        if engine.dialect.name == "sqlite":  # only SQLite stores text that is not JSON
            conn.execute(sa.insert(_jobs).values(
                id="job_bad_json", account_id="acct_1", kind="chat", model="m",
                request=None, stream=False, status="failed", hold_amount=0,
                charged_amount=0, fee_amount=0, prompt_tokens=0, completion_tokens=0,
                failovers=0, created_at=now))
            conn.execute(sa.text("UPDATE jobs SET request = '{\"model\": ' "
                                 "WHERE id = 'job_bad_json'"))
    return engine


def _requests(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(_jobs.c.id, sa.cast(_jobs.c.request, sa.Text))).all()
    return {job_id: (json.loads(text) if job_id != "job_bad_json" else text)
            for job_id, text in rows}


def _revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def _assert_converted(stored: dict[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS
                      ) -> None:
    for job_id, (kind, body, sampling) in CONVERTED.items():
        job = JobRequest.model_validate(stored[job_id])
        assert job.model_dump(mode="json") == stored[job_id]  # exactly the typed form
        assert job.kind == kind and job.model == body["model"]
        expected = dict(sampling)
        if expected["max_tokens"] == DEFAULT_MAX_TOKENS and "max_tokens" not in body:
            expected["max_tokens"] = default_max_tokens
        assert job.sampling.model_dump() == expected, job_id
        if kind == "chat":
            assert job.prompt is None and job.messages is not None
            assert [(m.role, m.content) for m in job.messages] == [
                (m["role"], m["content"]) for m in body["messages"]]
        else:
            assert job.messages is None and job.prompt == body["prompt"]
        # the digest every receipt of the job signed, with and without a prefix
        assert job.digest() == old_request_digest(kind, body), job_id
        assert job.digest([17, 4, 902]) == old_request_digest(kind, body, [17, 4, 902])
        if job_id in GOLDEN:
            assert job.digest() == GOLDEN[job_id]
    assert JobRequest.model_validate(stored["job_chat_full"]).digest(
        [17, 4, 902]) == GOLDEN_CHAT_CONTINUED


def _assert_kept(stored: dict[str, Any]) -> None:
    for job_id, (_, body) in KEPT.items():
        assert stored[job_id] == body, job_id
    if "job_bad_json" in stored:
        assert stored["job_bad_json"] == '{"model": '
    assert stored[TYPED_ID] == TYPED


# ---- the tests -----------------------------------------------------------------------------


def test_upgrade_rewrites_bodies_as_job_requests_with_their_digest(
        fresh_url: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = _seed(fresh_url)
    try:
        caplog.set_level(logging.INFO, logger="alembic.runtime.migration")
        upgrade(fresh_url)
        assert _revision(engine) != BEFORE
        stored = _requests(engine)
        _assert_converted(stored)
        _assert_kept(stored)
        kept = len(KEPT) + (engine.dialect.name == "sqlite")
        assert f"{len(CONVERTED)} rows rewritten" in caplog.text
        assert any(r.levelno == logging.WARNING and f"{kept} rows could not" in r.getMessage()
                   for r in caplog.records)
        upgrade(fresh_url)  # at head already: nothing changes
        assert _requests(engine) == stored
    finally:
        engine.dispose()


def test_downgrade_writes_bodies_back_and_upgrade_again_gives_the_same_rows(
        fresh_url: str) -> None:
    engine = _seed(fresh_url)
    try:
        upgrade(fresh_url, REVISION)
        typed = _requests(engine)
        command.downgrade(alembic_config(fresh_url), BEFORE)
        assert _revision(engine) == BEFORE
        bodies = _requests(engine)
        for job_id, (kind, body, sampling) in CONVERTED.items():
            back = bodies[job_id]
            # what the earlier code reads: the same digest, every sampling field explicit
            assert old_request_digest(kind, back) == old_request_digest(kind, body)
            assert back["model"] == body["model"] and back["n"] == 1
            assert back["stream"] is body["stream"]
            assert back["max_tokens"] == sampling["max_tokens"]
            assert back["temperature"] == sampling["temperature"]
            assert back["top_p"] == sampling["top_p"]
            assert back.get("seed") == sampling["seed"]
            assert back.get("stop", []) == sampling["stop"]
        for job_id, (_, body) in KEPT.items():
            assert bodies[job_id] == body, job_id
        # a job the market wrote typed goes back as a body too
        assert bodies[TYPED_ID] == {"model": "m1", "messages": [
            {"role": "user", "content": "Count to 5"}], "max_tokens": DEFAULT_MAX_TOKENS,
            "temperature": 1.0, "top_p": 1.0, "seed": 1, "stream": False, "n": 1}
        upgrade(fresh_url, REVISION)
        assert _requests(engine) == typed
    finally:
        engine.dispose()


def test_a_market_that_ran_another_default_max_tokens_passes_it(fresh_url: str) -> None:
    engine = _seed(fresh_url)
    try:
        config = alembic_config(fresh_url)
        config.cmd_opts = argparse.Namespace(x=["default_max_tokens=512"])
        command.upgrade(config, REVISION)
        stored = _requests(engine)
        _assert_converted(stored, default_max_tokens=512)
        _assert_kept(stored)
    finally:
        engine.dispose()


def test_tables_larger_than_a_batch_are_rewritten_whole(fresh_url: str) -> None:
    """Rows are read a batch (500) at a time by id: every batch is rewritten."""
    engine = _seed(fresh_url)
    try:
        now = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(sa.insert(_jobs), [
                {"id": f"job_many_{i:05d}", "account_id": "acct_1", "kind": "completion",
                 "model": "m2", "request": {"model": "m2", "stream": False, "n": 1,
                                            "prompt": f"p{i}", "max_tokens": i + 1},
                 "stream": False, "status": "succeeded", "hold_amount": 0,
                 "charged_amount": 0, "fee_amount": 0, "prompt_tokens": 0,
                 "completion_tokens": 0, "failovers": 0, "created_at": now}
                for i in range(1234)])
        upgrade(fresh_url, REVISION)
        stored = _requests(engine)
        many = {k: JobRequest.model_validate(v) for k, v in stored.items()
                if k.startswith("job_many_")}
        assert len(many) == 1234
        assert all(job.prompt == f"p{int(k[9:])}" and job.sampling.max_tokens == int(k[9:]) + 1
                   for k, job in many.items())
        _assert_converted(stored)
        _assert_kept(stored)
    finally:
        engine.dispose()


def test_golden_bodies_digest_as_pinned() -> None:
    """The earlier algorithm reimplemented above agrees with the pinned digests."""
    assert old_request_digest("chat", CONVERTED["job_chat_min"][1]) == GOLDEN_CHAT
    assert old_request_digest("chat", CONVERTED["job_chat_full"][1],
                              [17, 4, 902]) == GOLDEN_CHAT_CONTINUED
    assert old_request_digest("completion",
                              CONVERTED["job_completion_min"][1]) == GOLDEN_COMPLETION
    # and content parts did not digest as their text (why such rows are kept)
    parts = copy.deepcopy(KEPT["job_bad_parts"][1])
    text = {**parts, "messages": [{"role": "user", "content": "a"}]}
    assert old_request_digest("chat", parts) != old_request_digest("chat", text)
