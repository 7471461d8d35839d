"""What the in-process engines (llama.cpp, transformers) share around their model calls.

Both render chat the same way, append a failover continuation as exact token ids,
evaluate prompt then continuation one token at a time (as the uninterrupted run did)
before the shared token loop, and score in a worker thread. A subclass supplies only
the model-specific pieces: chat template, tokenizer, vocabulary size, the forward
calls and the scoring rows.

Token ids arriving from outside (a continuation an earlier node produced, output a
verifier is asked to score) are checked against the vocabulary here: an id out of
range would make llama.cpp abort the process or silently index another token's
logits (a negative id in numpy), and a CUDA gather would poison the device.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from inference._text import decode_loop
from inference._threaded import Emit, stream_from_thread
from inference.base import (
    Engine,
    EngineError,
    GenerationEvent,
    GenerationRequest,
    PositionScore,
)
from inference.grammar import GRAMMAR_ENGINE, GrammarTokenizer, tokenizer_for
from inference.shaping import LogitShaper, shaped_scores
from protocol.messages import Capabilities

Logits = np.ndarray


class LocalEngine(Engine):
    """Shared prompt handling, token-id validation, generation and scoring plumbing."""

    n_ctx: int

    # ---- what a subclass provides --------------------------------------------------

    @abc.abstractmethod
    def _is_started(self) -> bool: ...

    @abc.abstractmethod
    def _apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for ``messages`` (raise ``EngineError`` without a template)."""

    @abc.abstractmethod
    def _tokenize(self, text: str, request: GenerationRequest) -> list[int]: ...

    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of rows of the model's logits: valid token ids are 0 … vocab_size − 1."""

    @abc.abstractmethod
    def _run(
        self, slot: Any, request: GenerationRequest, emit: Emit, cancel: threading.Event
    ) -> None:
        """Generate in a worker thread on ``slot`` (from :meth:`_acquire`), via :meth:`_decode`."""

    async def _acquire(self) -> tuple[Any, Callable[[], None] | None]:
        """What one generation runs on, and how to give it back (default: nothing)."""
        return None, None

    @abc.abstractmethod
    def _score_output(
        self, request: GenerationRequest, prompt_ids: list[int], output_ids: list[int], k: int,
        slack: float,
    ) -> list[PositionScore]:
        """Score ``output_ids`` after ``prompt_ids`` (both validated, fitting the context),
        with ``sampler_excess`` (``inference.sampler.sampler_excesses``, nucleus slack
        ``slack``) for sampled requests."""

    # ---- lifecycle -------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._is_started():
            raise EngineError("engine_not_started", "call start() before serving")

    # ---- prompts ---------------------------------------------------------------------

    def render_prompt(self, request: GenerationRequest) -> str:
        """The text the model sees before its output (chat template applied)."""
        if request.kind == "completion":
            return request.prompt or ""
        messages = request.messages or []
        return self._apply_chat_template(messages)

    def check_token_ids(self, token_ids: list[int], what: str) -> None:
        """Refuse ids outside the vocabulary (they come from other machines)."""
        size = self.vocab_size()
        bad = next((t for t in token_ids if not 0 <= t < size), None)
        if bad is not None:
            raise EngineError(
                "invalid_token",
                f"{what} holds token id {bad}, outside the vocabulary (0…{size - 1})",
            )

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """Rendered prompt tokens, then the continuation token ids as given."""
        self._require_started()
        self.check_token_ids(request.continuation_token_ids, "continuation_token_ids")
        ids = self._tokenize(self.render_prompt(request), request)
        return list(ids) + list(request.continuation_token_ids)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.prompt_token_ids(request))

    # ---- generation ------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self._require_started()
        self.refuse_unsupported(request)
        slot, release = await self._acquire()
        events = stream_from_thread(
            lambda emit, cancel: self._run(slot, request, emit, cancel),
            on_finished=release,  # once, when the thread let go of ``slot``
        )
        async with contextlib.aclosing(events):  # a consumer that leaves stops the thread now
            async for event in events:
                yield event

    def _decode(
        self,
        request: GenerationRequest,
        emit: Emit,
        cancel: threading.Event,
        *,
        prefill: Callable[[list[int]], Logits],
        step: Callable[[int], Logits],
        piece: Callable[[int], bytes],
        is_eog: Callable[[int], bool],
    ) -> None:
        """Evaluate the prompt as one batch and the continuation one token at a time —
        exactly as the uninterrupted run evaluated them, so a continued greedy run
        reproduces it — then run the shared token loop. Runs in a worker thread."""
        prompt_ids = self.prompt_token_ids(request)
        if len(prompt_ids) >= self.n_ctx:
            raise EngineError(
                "context_length_exceeded",
                f"prompt of {len(prompt_ids)} tokens does not fit the context ({self.n_ctx})",
            )
        n_cont = len(request.continuation_token_ids)
        logits = prefill(prompt_ids[: len(prompt_ids) - n_cont])
        for token in request.continuation_token_ids:
            logits = step(token)
        decode_loop(
            request,
            logits=logits,
            step=step,
            piece=piece,
            is_eog=is_eog,
            prompt_tokens=len(prompt_ids),
            n_ctx=self.n_ctx,
            emit=emit,
            cancel=cancel,
            shaper=self._shaper(request),
        )

    def capabilities(self) -> Capabilities:
        return Capabilities(grammar=GRAMMAR_ENGINE, logit_shaping=True, logprobs=True)

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The token table grammars compile against: this engine's own pieces."""
        piece = self.token_piece()
        if piece is None:
            raise EngineError("invalid_constraint", "this engine has no token table")
        return tokenizer_for(self, lambda: ([piece(t) for t in range(self.vocab_size())],
                                            self.eog_token_ids()))

    def _shaper(self, request: GenerationRequest) -> LogitShaper | None:
        return LogitShaper.for_request(request, self.vocab_size(), self.grammar_tokenizer)

    # ---- scoring -----------------------------------------------------------------------

    def _score_sync(
        self, request: GenerationRequest, output_token_ids: list[int], k: int, slack: float
    ) -> list[PositionScore]:
        prompt_ids = self.prompt_token_ids(request)
        self.check_token_ids(output_token_ids, "output_token_ids")
        full = len(prompt_ids) + len(output_token_ids)
        if full > self.n_ctx:
            raise EngineError("context_length_exceeded", f"{full} tokens exceed {self.n_ctx}")
        if not output_token_ids:
            return []
        return self._score_output(request, prompt_ids, list(output_token_ids), k, slack)

    def _scores_from_rows(self, request: GenerationRequest, output_ids: list[int],
                          rows: np.ndarray, k: int, slack: float) -> list[PositionScore] | None:
        """The shaped job's scores from the raw logit ``rows`` (None: an unshaped job,
        which the engine scores its own faster way)."""
        shaper = self._shaper(request)
        if shaper is None:
            return None
        return shaped_scores(request, output_ids, rows, k, slack, self.eog_token_ids(), shaper)

    async def score(
        self, request: GenerationRequest, output_token_ids: list[int], top_k: int = 20,
        *, nucleus_noise: float = 0.0,
    ) -> list[PositionScore]:
        self._require_started()
        self.refuse_unsupported(request)
        if top_k < 1:
            raise EngineError("bad_request", "top_k must be >= 1")
        return await asyncio.to_thread(self._score_sync, request, list(output_token_ids), top_k,
                                       nucleus_noise)
