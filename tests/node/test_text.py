"""The shared token loop of the local engines, on synthetic logits."""

from __future__ import annotations

import threading

import numpy as np

from inference._text import decode_loop
from inference.base import GenerationEnd, GenerationRequest, TokenDelta
from inference.convert import generation_request
from inference.sampler import sample, sampler_key

VOCAB = 16


def _run(request: GenerationRequest) -> list[int]:
    rng = np.random.default_rng(123)
    table = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)
    events: list = []
    decode_loop(
        request,
        logits=table[0],
        step=lambda token: table[token],
        piece=lambda token: bytes([97 + token]),
        is_eog=lambda token: False,
        prompt_tokens=1,
        n_ctx=1000,
        emit=events.append,
        cancel=threading.Event(),
    )
    assert isinstance(events[-1], GenerationEnd)
    return [t for e in events if isinstance(e, TokenDelta) for t in e.token_ids]


def test_negative_seeds_sample_reproducibly() -> None:
    def request(seed: int) -> GenerationRequest:
        return generation_request("completion", {"prompt": "x", "max_tokens": 20,
                                                 "temperature": 1.0, "seed": seed})

    first = _run(request(-5))
    assert len(first) == 20 and first == _run(request(-5))
    assert first == _run(request(2**64 - 5))  # the same 64-bit seed


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    logits = np.array([0.5, 3.0, -1.0, 2.9], dtype=np.float32)
    key = sampler_key(0)
    assert {sample(logits, 1e-320, 1.0, key, position) for position in range(20)} == {1}
    assert sample(logits, 1e-320, 0.5, key, 3) == 1
