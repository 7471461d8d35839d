"""The one place an OpenAI request body becomes an engine-neutral ``GenerationRequest``."""

from __future__ import annotations

from typing import Any

from inference.base import GenerationRequest
from protocol.canonical import request_digest
from protocol.receipt import SamplingParams

DEFAULT_MAX_TOKENS = 256


class BadRequest(ValueError):
    """The body cannot be served (reported to the market as a job error ``bad_request``)."""


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number")
    return float(value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise BadRequest("stop must be a string or a list of strings")


def message_text(content: Any) -> str:
    """A message's content as the text a chat template renders.

    OpenAI content is a string or a list of parts; text parts are joined with newlines
    (as vLLM joins them), anything else (images, audio) cannot be served by a text model.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type", "text") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadRequest("only text content parts {'type': 'text', 'text': ...} are served")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest("message content must be a string or a list of text parts")


def chat_messages(messages: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """``{role, content}`` pairs with plain-text content: what every engine templates."""
    return [
        {"role": str(m.get("role")), "content": message_text(m.get("content"))}
        for m in messages or []
    ]


def generation_request(
    kind: str, body: dict[str, Any], continuation_token_ids: list[int] | None = None
) -> GenerationRequest:
    """Build a ``GenerationRequest`` from an OpenAI chat/completions body.

    Defaults follow OpenAI: temperature 1.0, top_p 1.0; ``max_tokens`` (or
    ``max_completion_tokens``) defaults to 256; ``stop`` may be a string or a list.
    """
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    if kind == "chat":
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
            raise BadRequest("messages must be a non-empty list of objects")
        messages = [dict(m) for m in raw]
        chat_messages(messages)  # refuses content no engine can render, before any work
    elif kind == "completion":
        raw_prompt = body.get("prompt", "")
        if isinstance(raw_prompt, list):
            if len(raw_prompt) != 1 or not isinstance(raw_prompt[0], str):
                raise BadRequest("prompt must be a string (one prompt per job)")
            raw_prompt = raw_prompt[0]
        if not isinstance(raw_prompt, str):
            raise BadRequest("prompt must be a string")
        prompt = raw_prompt
    else:
        raise BadRequest(f"unknown kind {kind!r}")

    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise BadRequest("max_tokens must be a non-negative integer")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    if temperature < 0:
        raise BadRequest("temperature must be >= 0")
    if not 0 < top_p <= 1:
        raise BadRequest("top_p must be in (0, 1]")
    return GenerationRequest(
        kind=kind,  # type: ignore[arg-type]
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=_stop(body.get("stop")),
        continuation_token_ids=list(continuation_token_ids or []),
    )


def request_sha256(request: GenerationRequest) -> str:
    """``protocol.canonical.request_digest`` of what the engine was asked."""
    request_input: Any = request.messages if request.kind == "chat" else (request.prompt or "")
    return request_digest(request.kind, request_input, request.continuation_token_ids)


def sampling_params(request: GenerationRequest) -> SamplingParams:
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=request.max_tokens,
        seed=request.seed,
        stop=list(request.stop),
    )
