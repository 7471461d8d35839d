"""A deterministic engine for router and failover tests (a test fixture only).

Each next token is a hash of the prompt and every token before it, so a node that
continues from any prefix produces exactly what one healthy node would have: the
property mid-stream failover must preserve. ``token_delay`` makes streams slow
enough to kill a node half-way. Tokens come on a fixed clock (token *i* at start +
*i* × ``token_delay``), as from a real engine that decodes in its own thread or on a
GPU: time its consumer spends on each token does not push the next one back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

from node_agent.engines.base import (
    Engine,
    GenerationEnd,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    PositionScore,
    TokenDelta,
)

VOCAB = ["<eos>"] + [f" w{i}" for i in range(1, 64)]
EOS = 0


def _prompt_text(request: GenerationRequest) -> str:
    if request.kind == "chat":
        return json.dumps([[m.get("role"), m.get("content")] for m in request.messages or []])
    return request.prompt or ""


def next_token(prompt: str, previous: list[int]) -> int:
    digest = hashlib.sha256(f"{prompt}|{previous}".encode()).digest()
    return digest[0] % len(VOCAB)


class DeterministicEngine(Engine):
    name = "deterministic"
    version = "1"

    def __init__(self, model_id: str = "test-model", token_delay: float = 0.0) -> None:
        self.model = ModelInfo(
            id=model_id,
            path="<memory>",
            sha256=hashlib.sha256(model_id.encode()).hexdigest(),
            quantization=None,
            context_length=4096,
        )
        self.token_delay = token_delay

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(_prompt_text(request).split()) + len(request.continuation_token_ids)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        prompt = _prompt_text(request)
        tokens = list(request.continuation_token_ids)
        produced = 0
        finish: str = "length"
        loop = asyncio.get_running_loop()
        due = loop.time()
        while produced < request.max_tokens:
            if self.token_delay:
                due += self.token_delay
                await asyncio.sleep(max(0.0, due - loop.time()))
            token = next_token(prompt, tokens)
            if token == EOS:
                finish = "stop"
                break
            tokens.append(token)
            produced += 1
            yield TokenDelta(text=VOCAB[token], token_ids=[token])
        yield GenerationEnd(
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=self.count_prompt_tokens(request),
            completion_tokens=produced,
        )

    async def score(
        self, request: GenerationRequest, output_token_ids: list[int], top_k: int = 20
    ) -> list[PositionScore]:
        prompt = _prompt_text(request)
        tokens = list(request.continuation_token_ids)
        scores = []
        for claimed in output_token_ids:
            expected = next_token(prompt, tokens)
            scores.append(
                PositionScore(
                    token_id=claimed,
                    logprob=0.0 if claimed == expected else -50.0,
                    top=[(expected, 0.0)],
                )
            )
            tokens.append(claimed)
        return scores
