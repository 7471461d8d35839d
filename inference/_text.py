"""Shared plumbing of local engines: the token loop, UTF-8 and stop strings, sampling."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from inference.base import GenerationEnd, GenerationEvent, GenerationRequest, TokenDelta
from protocol.text import TextStream


def sample_token(
    logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator
) -> int:
    """Greedy for temperature 0; else softmax(logits / T) restricted to the top-p nucleus."""
    if temperature == 0.0:
        return int(np.argmax(logits))
    # subtract the max before dividing: a tiny temperature then gives -inf (probability 0)
    # for every other token instead of inf - inf = NaN
    x = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        x = (x - x.max()) / temperature
    p = np.exp(x)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        cutoff = int(np.searchsorted(cumulative, top_p)) + 1
        keep = order[:cutoff]
        q = p[keep] / p[keep].sum()
        return int(keep[rng.choice(len(keep), p=q)])
    return int(rng.choice(len(p), p=p))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_k(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    k = min(k, logprobs.shape[-1])
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]


def decode_loop(
    request: GenerationRequest,
    *,
    logits: np.ndarray,
    step: Callable[[int], np.ndarray],
    piece: Callable[[int], bytes],
    is_eog: Callable[[int], bool],
    prompt_tokens: int,
    n_ctx: int,
    emit: Callable[[GenerationEvent], None],
    cancel: threading.Event,
) -> None:
    """The token loop every local engine runs once prompt (+ continuation) is evaluated.

    ``logits`` are those after the last prompt token; ``step(token)`` evaluates one
    token and returns the next logits; ``piece(token)`` is the token's output bytes.
    Emits ``TokenDelta``s then one ``GenerationEnd``; returns early when ``cancel`` is set.
    """
    # numpy takes only non-negative seeds; OpenAI's seed is any integer (two's complement)
    seed = request.seed if request.seed is None or request.seed >= 0 else request.seed % 2**64
    rng = np.random.default_rng(seed)
    text = TextStream(request.stop)
    text.prime([piece(t) for t in request.continuation_token_ids])
    produced = 0
    length = prompt_tokens
    finish = "length"
    stopped = False
    while produced < request.max_tokens and length < n_ctx:
        if cancel.is_set():
            return
        token = sample_token(logits, request.temperature, request.top_p, rng)
        if is_eog(token):
            finish = "stop"
            break
        produced += 1
        delta, stopped = text.push(piece(token))
        emit(TokenDelta(text=delta, token_ids=[token]))
        if stopped:
            finish = "stop"
            break
        if produced < request.max_tokens:
            logits = step(token)
            length += 1
    tail = "" if stopped else text.flush()
    if tail:
        emit(TokenDelta(text=tail, token_ids=[]))
    emit(
        GenerationEnd(
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens,
            completion_tokens=produced,
        )
    )
