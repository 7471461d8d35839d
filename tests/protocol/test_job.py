"""The job contract: the request digest is pinned, defaults live in one place."""

from __future__ import annotations

import pytest

from inference.convert import engine_request
from protocol.job import (
    DEFAULT_MAX_TOKENS,
    InvalidJobRequest,
    JobRequest,
    request_digest,
)
from protocol.messages import Job, encode, parse_market_message

# Digests receipts have carried since receipt version 1: a change here breaks every
# stored receipt's request_sha256, so these values are fixed, not recomputed.
GOLDEN = [
    ("chat", [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi, café ☕"}], [],
     "aab6514bc52a74e589f09f9d112ae0e5386ac5829d6a1a898ba879e205fad15d"),
    ("chat", [{"role": "user", "content": "Count to 5"}], [17, 4, 902],
     "c8b653a46622db4edc0578142ca16dbb8e1d5d95522f05766e2206e6924f531f"),
    ("completion", "Once upon a time", [],
     "e76e0e97c4a8b9b5497f03091a043b328e1f75c59e9276c4ddd18f0446c195b5"),
    ("completion", "", [5],
     "dcd1a2659cb46c17b084504e85fb19e733afbef559739296e716d2085fac5d21"),
    ("chat", [{"role": "user", "content": "a\nb"}], [],
     "a62a265545c3bf5e6b75273c7f7e7e936eca5bb7bb0d8742a687afa8f49dce37"),
]


@pytest.mark.parametrize(("kind", "request_input", "continuation", "digest"), GOLDEN)
def test_the_request_digest_is_pinned(kind, request_input, continuation, digest) -> None:
    assert request_digest(kind, request_input, continuation) == digest
    body = {"model": "m", ("messages" if kind == "chat" else "prompt"): request_input}
    job = JobRequest.from_openai(kind, body)
    assert job.digest(continuation) == digest
    assert engine_request(job, continuation).digest() == digest


def test_text_parts_are_digested_as_the_text_the_model_reads() -> None:
    """Content parts are joined as the engines join them, so the digest covers what the
    model was asked, not how the client spelled it."""
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    job = JobRequest.from_openai("chat", {"model": "m",
                                          "messages": [{"role": "user", "content": parts}]})
    assert job.messages is not None and job.messages[0].content == "a\nb"
    assert job.digest() == GOLDEN[4][3]


def test_openai_defaults_are_applied_once() -> None:
    job = JobRequest.from_openai("completion", {"model": "m", "prompt": "p"})
    assert job.sampling.model_dump() == {"temperature": 1.0, "top_p": 1.0,
                                         "max_tokens": DEFAULT_MAX_TOKENS, "seed": None,
                                         "stop": []}
    aliased = JobRequest.from_openai("completion", {"model": "m", "prompt": ["p"], "stop": "x",
                                                    "max_completion_tokens": 9})
    assert aliased.prompt == "p" and aliased.sampling.max_tokens == 9
    assert aliased.sampling.stop == ["x"]
    assert JobRequest.from_openai("chat", {"model": "m", "messages": [{"role": "user"}],
                                           "stop": ["", "y"]}).sampling.stop == ["y"]


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "temperature": -1},
    {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": True},
    {"messages": [{"role": "user", "content": "x"}], "seed": 1.5},
    {"messages": [{"role": "user", "content": "x"}], "stop": [1]},
])
def test_bodies_no_engine_can_serve_are_refused(body) -> None:
    with pytest.raises(InvalidJobRequest):
        JobRequest.from_openai("chat", {"model": "m", **body})


def test_a_job_is_consistent_with_its_kind() -> None:
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 1}
    with pytest.raises(ValueError):
        JobRequest(kind="chat", model="m", prompt="p", sampling=sampling)
    with pytest.raises(ValueError):
        JobRequest(kind="completion", model="m", sampling=sampling)
    with pytest.raises(ValueError):
        JobRequest(kind="completion", model="m", prompt="p",
                   sampling={**sampling, "top_p": 1.5})


def test_the_job_frame_carries_the_request_typed() -> None:
    job = JobRequest.from_openai("chat", {"model": "m", "seed": 3,
                                          "messages": [{"role": "user", "content": "hi"}]})
    frame = Job(job_id="j", request=job.with_max_tokens(7), deadline=1.0,
                continuation_token_ids=[1, 2])
    parsed = parse_market_message(encode(frame))
    assert isinstance(parsed, Job)
    assert parsed.request.sampling.max_tokens == 7 and parsed.request.sampling.seed == 3
    assert parsed.request.digest([1, 2]) == job.digest([1, 2])
    assert job.sampling.max_tokens == DEFAULT_MAX_TOKENS  # with_max_tokens copies
