"""What a job does to the logits before the protocol sampler, and how a verifier redoes it.

OpenAI's order: ``logit_bias`` is added; ``count[v]·frequency_penalty +
(count[v] > 0)·presence_penalty`` is subtracted, ``count`` counting v in the output so
far (a failover continuation included: it is output); then the output constraint's
grammar mask (``inference.grammar``) sets every token that would leave the grammar to
−inf. The sampler then tempers and truncates as always.

Every step is a deterministic function of the job and the output prefix, so the node
that generates and the verifier that re-scores compute the same shaped distribution up
to the usual numeric noise: the verifier judges each claimed token against the
distribution the node had to sample from, an honest constrained job stays within
tolerance and a node that ignored the bias, the penalties or the grammar emits tokens
that are improbable or impossible under it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from inference._text import log_softmax, top_k
from inference.base import EngineError, GenerationRequest, PositionScore
from inference.grammar import GrammarMatcher, GrammarTokenizer, InvalidConstraint
from inference.sampler import sampler_excess, sampler_key

# a token the grammar forbids: finite (it is stored as JSON), far below anything sampled
MASKED_LOGPROB = -1.0e4


class LogitShaper:
    """One output's shaping state: token counts and the grammar position."""

    def __init__(self, request: GenerationRequest, vocab_size: int,
                 matcher: GrammarMatcher | None) -> None:
        s = request.sampling
        self._size = vocab_size
        self._bias: np.ndarray | None = None
        if s.logit_bias:
            ids = np.array([token for token, _ in s.logit_bias], dtype=np.int64)
            if int(ids.max()) >= vocab_size:
                raise EngineError("invalid_token", f"logit_bias names token {int(ids.max())}, "
                                  f"outside the vocabulary (0…{vocab_size - 1})")
            self._bias = np.zeros(vocab_size, dtype=np.float32)
            self._bias[ids] = [bias for _, bias in s.logit_bias]
        self._presence = np.float32(s.presence_penalty)
        self._frequency = np.float32(s.frequency_penalty)
        self._counts = np.zeros(vocab_size, dtype=np.float32) if (
            s.presence_penalty or s.frequency_penalty) else None
        self.matcher = matcher

    @classmethod
    def for_request(cls, request: GenerationRequest, vocab_size: int,
                    tokenizer: Callable[[], GrammarTokenizer]) -> LogitShaper | None:
        """The shaper of ``request`` (primed with its continuation), or None when the job
        shapes nothing: the unshaped path stays exactly as fast as before."""
        job = request.job
        if not job.shaped:
            return None
        matcher = None
        if job.constraint is not None:
            try:
                matcher = GrammarMatcher(tokenizer(), job.constraint)
            except InvalidConstraint as exc:
                raise EngineError("invalid_constraint", str(exc)) from None
        shaper = cls(request, vocab_size, matcher)
        for token in request.continuation_token_ids:
            shaper.accept(token)
        return shaper

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """The shaped copy of one position's logits (−inf where the grammar forbids)."""
        x = np.array(logits, dtype=np.float32, copy=True)
        if self._bias is not None:
            x += self._bias
        if self._counts is not None:
            x -= self._counts * self._frequency + (self._counts > 0) * self._presence
        if self.matcher is not None:
            allowed = self.matcher.allowed()
            if allowed is not None:
                if not allowed.any():
                    raise EngineError("grammar_error", "the grammar allows no next token")
                x[~allowed] = -np.inf
        return x

    def accept(self, token: int) -> bool:
        """Record ``token`` as output; False when the grammar forbids it."""
        if self._counts is not None and 0 <= token < self._size:
            self._counts[token] += 1
        return self.matcher.accept(token) if self.matcher is not None else True

    @property
    def complete(self) -> bool:
        """Ending here leaves a valid document (always, without a constraint)."""
        return self.matcher is None or self.matcher.complete


def shaped_logprobs(shaped: np.ndarray) -> np.ndarray:
    """log softmax of shaped logits, masked tokens at :data:`MASKED_LOGPROB`."""
    lp = log_softmax(shaped)
    lp[~np.isfinite(lp)] = MASKED_LOGPROB
    return lp


def shaped_scores(request: GenerationRequest, output_ids: Sequence[int], rows: np.ndarray,
                  k: int, slack: float, eog_ids: Sequence[int],
                  shaper: LogitShaper) -> list[PositionScore]:
    """The verifier's scores of a shaped job: each row shaped as the node had to shape it
    for that prefix, judged on the shaped distribution; the raw top-k kept for the
    fingerprint, which the node computes over the model's own logits."""
    key = sampler_key(request.seed)
    start = len(request.continuation_token_ids)
    eog = sorted(set(eog_ids))
    scores = []
    for i, token in enumerate(output_ids):
        raw = np.asarray(rows[i])
        lp = shaped_logprobs(shaper.apply(raw))
        shaper.accept(int(token))
        excess = None
        if request.temperature > 0.0:
            excess = sampler_excess(lp, int(token), request.temperature, request.top_p, key,
                                    start + i, slack, eog if token in eog else ())
        scores.append(PositionScore(
            token_id=int(token), logprob=float(lp[token]), top=top_k(lp, k),
            sampler_excess=excess, fingerprint_top=top_k(log_softmax(raw), k)))
    return scores
