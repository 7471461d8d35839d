"""The one small interface every inference engine implements.

Two jobs: ``generate`` streams tokens for a request (with the token ids, which go
into receipts and make mid-stream failover exact), and ``score`` runs one prefill
over prompt + a claimed continuation and returns per-position log-probabilities, which
is how verifiers re-check a node's work far cheaper than generating it again.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class ModelInfo:
    id: str
    path: str
    sha256: str
    quantization: str | None
    context_length: int


@dataclass
class GenerationRequest:
    """What to generate, in engine-neutral terms (built from an OpenAI body)."""

    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Output an earlier node already produced; continue right after these tokens.
    continuation_token_ids: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenDelta:
    """Newly generated text and the token ids that produced it."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class GenerationEnd:
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


GenerationEvent = TokenDelta | GenerationEnd


@dataclass(frozen=True)
class PositionScore:
    """The verifier's view of one output position."""

    token_id: int  # the claimed token at this position
    logprob: float  # its log-probability under the verifier
    top: list[tuple[int, float]]  # the verifier's top-k (token id, logprob), best first


class EngineError(Exception):
    """An engine failed to serve a request (reported to the market as a job error)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Engine(abc.ABC):
    name: str
    version: str
    model: ModelInfo

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Yield ``TokenDelta``s then exactly one ``GenerationEnd``.

        ``completion_tokens`` counts only tokens generated here (not the continuation).
        Cancelling the consuming task must stop generation promptly.
        """

    @abc.abstractmethod
    async def score(
        self, request: GenerationRequest, output_token_ids: list[int], top_k: int = 20
    ) -> list[PositionScore]:
        """Score ``output_token_ids`` as the continuation of ``request`` in one prefill."""

    @abc.abstractmethod
    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens the rendered prompt (with template and continuation) occupies."""

    async def prompt_token_count(self, request: GenerationRequest) -> int:
        """:meth:`count_prompt_tokens` for engines that must ask a server to tokenize."""
        return self.count_prompt_tokens(request)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load weights / start child processes. Called once before serving."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
