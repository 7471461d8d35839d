"""The job contract: what a buyer asked for, in the one typed form every party uses.

The market builds a :class:`JobRequest` once from the buyer's OpenAI body
(:meth:`JobRequest.from_openai`), sends it on the node link, stores it with the job and
hands it to the verifier; engines get it through ``inference.convert.engine_request``.
The defaults below are written here only, because the signed receipt attests the
sampling parameters and the request digest: a default restated elsewhere could drift
and turn honest receipts into mismatches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.canonical import digest_json

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
DEFAULT_TOP_P = 1.0  # OpenAI's default

JobKind = Literal["chat", "completion"]
# "cancelled": the market sent ``cancel``; the receipt covers what was produced by then
FinishReason = Literal["stop", "length", "cancelled"]


class InvalidJobRequest(ValueError):
    """An OpenAI body that no engine can serve (a 400 at the market)."""


class _Strict(BaseModel):
    # NaN and infinity cannot be hashed canonically: a peer sending one is malformed
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class SamplingParams(_Strict):
    """The sampling knobs that determine what output is legitimate (receipts attest them).

    Unconstrained on purpose: a receipt carries the node's claim, and a claim outside
    any legal range must reach the receipt checks as a mismatch, not fail to parse."""

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Usage(_Strict):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class ChatTurn(_Strict):
    """One chat message as a model reads it: a role and plain text."""

    role: str
    content: str


class JobRequest(_Strict):
    """One generation: the prompt (chat turns or completion text) and its sampling."""

    kind: JobKind
    model: str
    messages: list[ChatTurn] | None = None
    prompt: str | None = None
    sampling: SamplingParams

    @model_validator(mode="after")
    def _consistent(self) -> JobRequest:
        if self.kind == "chat" and (not self.messages or self.prompt is not None):
            raise ValueError("a chat job has messages (at least one) and no prompt")
        if self.kind == "completion" and (self.prompt is None or self.messages is not None):
            raise ValueError("a completion job has a prompt and no messages")
        s = self.sampling
        if s.max_tokens < 0 or s.temperature < 0 or not 0 < s.top_p <= 1:
            raise ValueError("max_tokens >= 0, temperature >= 0 and 0 < top_p <= 1")
        return self

    @property
    def input(self) -> list[dict[str, str]] | str:
        """The prompt as the digest and chat templates take it."""
        if self.kind == "chat":
            return [{"role": m.role, "content": m.content} for m in self.messages or []]
        return self.prompt or ""

    def digest(self, continuation_token_ids: Sequence[int] = ()) -> str:
        """The receipt's ``request_sha256`` for this job given ``continuation_token_ids``."""
        return request_digest(self.kind, self.input, continuation_token_ids)

    def with_max_tokens(self, max_tokens: int) -> JobRequest:
        """This job with fewer tokens left (a failover segment continues after others)."""
        return self.model_copy(
            update={"sampling": self.sampling.model_copy(update={"max_tokens": max_tokens})})

    def with_seed(self, seed: int) -> JobRequest:
        """This job with its sampling seed fixed (the market sets one when the buyer did
        not: the protocol sampler draws its noise from it, so the verifier can too)."""
        return self.model_copy(
            update={"sampling": self.sampling.model_copy(update={"seed": seed})})

    @classmethod
    def from_openai(cls, kind: str, body: Mapping[str, Any],
                    default_max_tokens: int = DEFAULT_MAX_TOKENS) -> JobRequest:
        """Build the job from an OpenAI chat/completions body (raises InvalidJobRequest).

        ``max_completion_tokens`` is an alias of ``max_tokens``; ``stop`` may be a string
        or a list (empty strings mean nothing); text content parts are joined with
        newlines, as vLLM joins them; the model and field bounds are the market's to check.
        """
        if kind == "chat":
            turns, prompt = _chat_turns(body.get("messages")), None
        elif kind == "completion":
            turns, prompt = None, _completion_prompt(body.get("prompt", ""))
        else:
            raise InvalidJobRequest(f"unknown kind {kind!r}")
        try:
            return cls(kind=kind, model=str(body.get("model") or ""), messages=turns,
                       prompt=prompt, sampling=_sampling(body, default_max_tokens))
        except ValueError as exc:  # pydantic's ValidationError is one
            raise InvalidJobRequest(_first_error(exc)) from None


def request_digest(kind: str, request_input: str | Sequence[Mapping[str, Any]],
                   continuation_token_ids: Sequence[int] = ()) -> str:
    """Digest of what the model was asked: the prompt or the turns, plus any prefix.

    ``continuation_token_ids`` are the tokens earlier nodes produced when a job fails
    over mid-stream; the new node's receipt covers prompt + that prefix. Turns are
    reduced to role and content so extra client fields do not matter.
    """
    normalized: Any = request_input
    if kind == "chat":
        normalized = [{"role": m.get("role"), "content": m.get("content")}
                      for m in request_input]  # type: ignore[union-attr]
    return digest_json({"kind": kind, "input": normalized,
                        "continuation": list(continuation_token_ids)})


# ---- the OpenAI body, read once ------------------------------------------------------


def message_text(content: Any) -> str:
    """A message's content as the text a chat template renders."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (not isinstance(part, Mapping) or part.get("type", "text") != "text"
                    or not isinstance(part.get("text"), str)):
                raise InvalidJobRequest(
                    "only text content parts {'type': 'text', 'text': ...} are served")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidJobRequest("message content must be a string or a list of text parts")


def _chat_turns(raw: Any) -> list[ChatTurn]:
    if not isinstance(raw, list) or not raw or not all(isinstance(m, Mapping) for m in raw):
        raise InvalidJobRequest("messages must be a non-empty list of objects")
    return [ChatTurn(role=str(m.get("role")), content=message_text(m.get("content")))
            for m in raw]


def _completion_prompt(raw: Any) -> str:
    if isinstance(raw, list):
        if len(raw) != 1 or not isinstance(raw[0], str):
            raise InvalidJobRequest("prompt must be a string (one prompt per job)")
        raw = raw[0]
    if not isinstance(raw, str):
        raise InvalidJobRequest("prompt must be a string")
    return raw


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidJobRequest(f"{key} must be a number")
    return float(value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise InvalidJobRequest("stop must be a string or a list of strings")


def _sampling(body: Mapping[str, Any], default_max_tokens: int) -> SamplingParams:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise InvalidJobRequest("max_tokens must be a non-negative integer")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidJobRequest("seed must be an integer")
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE)
    top_p = _number(body, "top_p", DEFAULT_TOP_P)
    if temperature < 0:
        raise InvalidJobRequest("temperature must be >= 0")
    if not 0 < top_p <= 1:
        raise InvalidJobRequest("top_p must be in (0, 1]")
    return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                          seed=seed, stop=_stop(body.get("stop")))


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", exc)).removeprefix("Value error, ")
    return str(exc)
