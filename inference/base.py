"""The one small interface every inference engine implements.

Two jobs: ``generate`` streams tokens for a request (with the token ids, which go
into receipts and make mid-stream failover exact), and ``score`` runs one prefill
over prompt + a claimed continuation and returns per-position log-probabilities, which
is how verifiers re-check a node's work far cheaper than generating it again.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

from protocol.job import JobKind, JobRequest, SamplingParams
from protocol.messages import Capabilities, TokenLogprob


@dataclass(frozen=True)
class ModelInfo:
    id: str
    path: str
    sha256: str
    quantization: str | None
    context_length: int


@dataclass(frozen=True)
class GenerationRequest:
    """What an engine is asked: the job (``protocol.job.JobRequest``, which holds every
    default) and the output earlier nodes produced, to continue right after."""

    job: JobRequest
    continuation_token_ids: list[int] = field(default_factory=list)

    @property
    def kind(self) -> JobKind:
        return self.job.kind

    @property
    def messages(self) -> list[dict[str, str]] | None:
        return self.job.input if self.job.kind == "chat" else None  # type: ignore[return-value]

    @property
    def prompt(self) -> str | None:
        return self.job.prompt

    @property
    def sampling(self) -> SamplingParams:
        return self.job.sampling

    @property
    def max_tokens(self) -> int:
        return self.job.sampling.max_tokens

    @property
    def temperature(self) -> float:
        return self.job.sampling.temperature

    @property
    def top_p(self) -> float:
        return self.job.sampling.top_p

    @property
    def seed(self) -> int | None:
        return self.job.sampling.seed

    @property
    def stop(self) -> list[str]:
        return self.job.sampling.stop

    @property
    def greedy(self) -> bool:
        return self.job.sampling.greedy

    def digest(self) -> str:
        """The receipt's ``request_sha256``: the job and its continuation prefix."""
        return self.job.digest(self.continuation_token_ids)


@dataclass(frozen=True)
class TokenDelta:
    """Newly generated text, the token ids that produced it, and their fingerprint rows
    (``protocol.fingerprint``: one row per id, from the distribution it was drawn from)."""

    text: str
    token_ids: list[int]
    fingerprint: bytes = b""
    # jobs that asked for log-probabilities: one entry per id (protocol.messages)
    logprobs: list[TokenLogprob] | None = None


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
    # sampled jobs: how far the claimed token falls short of the protocol sampler's choice
    # on these numbers, in nats (inference.sampler.sampler_excess); None: not computed
    sampler_excess: float | None = None
    # shaped jobs (inference.shaping): ``top`` is over the shaped distribution the node
    # sampled from, this over the model's own logits, which the fingerprint commits to
    fingerprint_top: list[tuple[int, float]] | None = None


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
        self, request: GenerationRequest, output_token_ids: list[int], top_k: int = 20,
        *, nucleus_noise: float = 0.0,
    ) -> list[PositionScore]:
        """Score ``output_token_ids`` as the continuation of ``request`` in one prefill.

        Engines that see the whole distribution also fill ``sampler_excess`` for sampled
        requests, allowing ``nucleus_noise`` nats of numeric noise at the nucleus edge."""

    @abc.abstractmethod
    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens the rendered prompt (with template and continuation) occupies."""

    async def prompt_token_count(self, request: GenerationRequest) -> int:
        """:meth:`count_prompt_tokens` for engines that must ask a server to tokenize."""
        return self.count_prompt_tokens(request)

    def capabilities(self) -> Capabilities:
        """What this engine serves beyond plain generation (declared in ``hello``; the
        router sends a job only where it can be served). Default: nothing."""
        return Capabilities()

    def refuse_unsupported(self, request: GenerationRequest) -> None:
        """Raise ``EngineError("unsupported_parameter")`` for a job this engine cannot
        serve faithfully (a router bug or a hostile market, never silently ignored)."""
        caps = self.capabilities()
        job = request.job
        if job.constraint is not None and caps.grammar is None:
            raise EngineError("unsupported_parameter", "this engine serves no response_format")
        if job.sampling.shaped and not caps.logit_shaping:
            raise EngineError("unsupported_parameter",
                              "this engine serves no penalties or logit_bias")
        if job.logprobs is not None and not caps.logprobs:
            raise EngineError("unsupported_parameter", "this engine returns no logprobs")

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load weights / start child processes. Called once before serving."""

    # ---- what a verifier may ask: declared here, the defaults say "this engine cannot" ----

    def vocab_size(self) -> int | None:
        """Rows of the model's logits (valid ids are 0 … size − 1); None when unknown."""
        return None

    def eog_token_ids(self) -> list[int]:
        """Every id that ends generation; empty when unknown (no natural-stop check)."""
        return []

    def token_piece(self) -> Callable[[int], bytes] | None:
        """The bytes one token adds to the output text, for replaying the protocol's text
        rule over ids a node claims; None when the engine has no vocabulary table."""
        return None

    def check_token_ids(self, token_ids: list[int], what: str) -> None:  # noqa: B027
        """Raise ``EngineError("invalid_token")`` for ids outside the vocabulary (ids come
        from other machines); engines that cannot tell accept them."""

    def decode(self, token_ids: list[int]) -> str | None:
        """The text ``token_ids`` decode to; None when the engine cannot decode."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
