"""Shared plumbing of local engines: the token loop, UTF-8 and stop strings; tokens are
drawn by the protocol sampler (``inference.sampler``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from inference.base import GenerationEnd, GenerationEvent, GenerationRequest, TokenDelta
from inference.sampler import sample, sampler_key
from protocol import fingerprint
from protocol.messages import TokenLogprob
from protocol.text import TextStream

if TYPE_CHECKING:
    from inference.shaping import LogitShaper


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_k(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    k = min(k, logprobs.shape[-1])
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]


def fingerprint_row(logits: np.ndarray) -> bytes:
    """The fingerprint row (``protocol.fingerprint``) of the distribution ``logits``
    give at temperature 1. Runs once a token, so not :func:`top_k` over a full
    :func:`log_softmax`: K argmax passes and one log-sum-exp cost a tenth of that."""
    x = np.asarray(logits, dtype=np.float32)
    rest = x.copy()
    head: list[int] = []
    for _ in range(min(fingerprint.K, x.shape[-1])):
        best = int(rest.argmax())  # the lowest id among equals: ties broken by id
        head.append(best)
        rest[best] = -np.inf
    top = float(x[head[0]])
    lse = top + float(np.log(np.exp(x - top, dtype=np.float64).sum()))
    return fingerprint.encode_row((i, float(x[i]) - lse) for i in head)


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """What a buyer who asked for logprobs sees of one position (temperature 1)."""
    lp = log_softmax(logits)
    return TokenLogprob(token_id=token, logprob=min(0.0, float(lp[token])),
                        top=[(t, min(0.0, v)) for t, v in top_k(lp, k)] if k else [])


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
    shaper: LogitShaper | None = None,
) -> None:
    """The token loop every local engine runs once prompt (+ continuation) is evaluated.

    ``logits`` are those after the last prompt token; ``step(token)`` evaluates one
    token and returns the next logits; ``piece(token)`` is the token's output bytes.
    Emits ``TokenDelta``s then one ``GenerationEnd``; returns early when ``cancel`` is set.
    ``shaper`` (``inference.shaping``, primed with the continuation): the job's bias,
    penalties and grammar, applied before the sampler; the fingerprint and the returned
    log-probabilities stay those of the model's own logits.
    """
    want_logprobs = request.job.logprobs
    # the protocol sampler (inference.sampler): position counts the whole output, so a
    # node continuing another's output draws the noise the first node would have drawn
    key = sampler_key(request.seed)
    start = len(request.continuation_token_ids)
    text = TextStream(request.stop)
    text.prime([piece(t) for t in request.continuation_token_ids])
    produced = 0
    length = prompt_tokens
    finish = "length"
    stopped = False
    while produced < request.max_tokens and length < n_ctx:
        if cancel.is_set():
            return
        drawn = shaper.apply(logits) if shaper is not None else logits
        token = sample(drawn, request.temperature, request.top_p, key, start + produced)
        if is_eog(token):
            finish = "stop"
            break
        if shaper is not None:
            shaper.accept(token)
        produced += 1
        delta, stopped = text.push(piece(token))
        emit(TokenDelta(text=delta, token_ids=[token], fingerprint=fingerprint_row(logits),
                        logprobs=None if want_logprobs is None
                        else [token_logprob(logits, token, want_logprobs)]))
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
