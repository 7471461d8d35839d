"""The deterministic engine: a model-free engine for tests, benchmarks and local demos.

Each next token is a hash of the prompt and every token before it, so a node that
continues from any prefix produces exactly what one healthy node would have: the
property mid-stream failover must preserve. Its text follows the protocol's rules
(:class:`protocol.text.TextStream`: UTF-8 pieces, stop strings) like every engine, and
its vocabulary (:class:`FakeVocabulary`) is what a market lists for it, so the market
counts prompts and checks text for it exactly as for a real model.

``token_delay`` makes streams slow enough to kill a node half-way. Tokens come on a
fixed clock (token *i* at start + *i* × ``token_delay``), as from a real engine that
decodes in its own thread or on a GPU: time its consumer spends on each token does
not push the next one back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable

from inference.base import (
    Engine,
    EngineError,
    GenerationEnd,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    PositionScore,
    TokenDelta,
)
from inference.vocab import Vocabulary
from protocol import fingerprint
from protocol.text import TextStream

VOCAB = ["<eos>"] + [f" w{i}" for i in range(1, 64)]
EOS = 0
CONTEXT_LENGTH = 4096


def prompt_text(request: GenerationRequest) -> str:
    if request.kind == "chat":
        return json.dumps([[m.get("role"), m.get("content")] for m in request.messages or []])
    return request.prompt or ""


def next_token(prompt: str, previous: list[int]) -> int:
    digest = hashlib.sha256(f"{prompt}|{previous}".encode()).digest()
    return digest[0] % len(VOCAB)


def likely_tokens(prompt: str, previous: list[int]) -> list[tuple[int, float]]:
    """The engine's "distribution" at a position, best first: the next token and, far
    below, its three successors in the vocabulary (what it fingerprints and scores)."""
    best = next_token(prompt, previous)
    return [(best, 0.0)] + [((best + i) % len(VOCAB), -7.0 - i) for i in range(1, 4)]


def fake_sha256(model_id: str) -> str:
    """The weights hash a deterministic engine serving ``model_id`` reports."""
    return hashlib.sha256(model_id.encode()).hexdigest()


class FakeVocabulary(Vocabulary):
    """Whitespace words are prompt tokens; ``VOCAB`` holds the output pieces."""

    size = len(VOCAB)
    eog_token_ids = (EOS,)

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        words = prompt_text(request).split()
        ids = [hashlib.sha256(w.encode()).digest()[0] % len(VOCAB) for w in words]
        return ids + list(request.continuation_token_ids)

    def piece(self, token_id: int) -> bytes:
        return b"" if token_id == EOS else VOCAB[token_id].encode()


class DeterministicEngine(Engine):
    name = "deterministic"
    version = "1"

    def __init__(
        self,
        model_id: str = "test-model",
        token_delay: float = 0.0,
        context_length: int = CONTEXT_LENGTH,
    ) -> None:
        self.model = ModelInfo(
            id=model_id,
            path="<memory>",
            sha256=fake_sha256(model_id),
            quantization=None,
            context_length=context_length,
        )
        self.token_delay = token_delay
        self.vocabulary = FakeVocabulary()

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.vocabulary.prompt_token_ids(request))

    def eog_token_ids(self) -> list[int]:
        return [EOS]

    def vocab_size(self) -> int:
        return len(VOCAB)

    def check_token_ids(self, token_ids: list[int], what: str) -> None:
        """Refuse ids outside the vocabulary (they come from other machines)."""
        bad = next((t for t in token_ids if not self.vocabulary.valid(t)), None)
        if bad is not None:
            raise EngineError("invalid_token", f"{what} holds token id {bad}, outside the "
                              f"vocabulary (0…{len(VOCAB) - 1})")

    def token_piece(self) -> Callable[[int], bytes]:
        return self.vocabulary.piece

    def decode(self, token_ids: list[int]) -> str:
        return b"".join(self.vocabulary.piece(t) for t in token_ids).decode(errors="replace")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        prompt = prompt_text(request)
        tokens = list(request.continuation_token_ids)
        prompt_tokens = self.count_prompt_tokens(request)
        text = TextStream(request.stop)
        text.prime(self.vocabulary.piece(t) for t in tokens)
        produced = 0
        finish: str = "length"
        stopped = False
        loop = asyncio.get_running_loop()
        due = loop.time()
        context = self.model.context_length
        while produced < request.max_tokens and prompt_tokens + produced < context:
            if self.token_delay:
                due += self.token_delay
                await asyncio.sleep(max(0.0, due - loop.time()))
            token = next_token(prompt, tokens)
            if token == EOS:
                finish = "stop"
                break
            row = fingerprint.encode_row(likely_tokens(prompt, tokens))
            tokens.append(token)
            produced += 1
            delta, stopped = text.push(self.vocabulary.piece(token))
            yield TokenDelta(text=delta, token_ids=[token], fingerprint=row)
            if stopped:
                finish = "stop"
                break
        tail = "" if stopped else text.flush()
        if tail:
            yield TokenDelta(text=tail, token_ids=[])
        yield GenerationEnd(
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens,
            completion_tokens=produced,
        )

    async def score(
        self, request: GenerationRequest, output_token_ids: list[int], top_k: int = 20,
        *, nucleus_noise: float = 0.0,
    ) -> list[PositionScore]:
        prompt = prompt_text(request)
        tokens = list(request.continuation_token_ids)
        scores = []
        for claimed in output_token_ids:
            top = likely_tokens(prompt, tokens)
            scores.append(
                PositionScore(
                    token_id=claimed,
                    logprob=dict(top).get(claimed, -50.0),
                    top=top,
                )
            )
            tokens.append(claimed)
        return scores
