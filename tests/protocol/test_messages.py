"""Node-link frames parse into their types and reject anything else."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.job import JobRequest
from protocol.messages import Cancel, Hello, Job, encode, parse_market_message, parse_node_message


def test_hello_round_trip() -> None:
    hello = Hello(
        pubkey="x",
        agent_version="0.1",
        models=[{"id": "m", "sha256": "00", "engine": "llamacpp", "context_length": 2048}],
        price={"input": 1, "output": 2},
        max_concurrency=2,
    )
    parsed = parse_node_message(encode(hello))
    assert isinstance(parsed, Hello) and parsed == hello


def test_market_frames_parse() -> None:
    request = JobRequest.from_openai("chat", {"model": "m", "messages": [{"role": "user",
                                                                       "content": "hi"}]})
    job = Job(job_id="j", request=request, deadline=1.0)
    assert isinstance(parse_market_message(encode(job)), Job)
    assert isinstance(parse_market_message('{"type":"cancel","job_id":"j"}'), Cancel)


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"welcome","node_id":"n","heartbeat_interval":1}',  # market frame from a node
        '{"type":"chunk","job_id":"j","text":"a"}',  # missing token_ids
        '{"type":"status","running":-1,"queued":0}',  # negative load
        '{"type":"status","running":0,"queued":0,"extra":1}',  # unknown field
        "not json",
    ],
)
def test_bad_node_frames_are_rejected(frame: str) -> None:
    with pytest.raises(ValidationError):
        parse_node_message(frame)


def test_hello_needs_a_model() -> None:
    with pytest.raises(ValidationError):
        Hello(pubkey="x", agent_version="0", models=[], price={"input": 0, "output": 0}, max_concurrency=1)
