"""OpenAI-compatible request bodies (validated) and response builders (plain dicts).

A body may carry only what the market serves (``market.api.parameters``: OpenAI's
other parameters at their "off" value only, unknown names refused).
``max_price_per_mtok`` is the market's extra body field: the buyer's price cap in AIDP
base units per million tokens. Responses are built as dicts: they are on the hot path
and their shape is OpenAI's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from market.api import parameters
from market.errors import validation_error
from protocol.embedding import vector_base64
from protocol.job import (
    LOGIT_BIAS_LIMIT,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_TOP_LOGPROBS,
    PENALTY_LIMIT,
    JobRequest,
)
from protocol.messages import TokenLogprob
from protocol.tools import MAX_TOOLS, Tool, ToolMode, parse_tools, tool_mode

# Upper bounds that keep every number a request carries inside what the database and
# the arithmetic on it hold (BIGINT); real limits (context length) apply later.
MAX_TOKENS_LIMIT = 1_000_000
MAX_PRICE = 10**15
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the completions endpoint
MAX_CHOICES = 8  # n: one job per choice, each held, receipted and billed


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class RequestBody(BaseModel):
    """Base of every JSON body the market accepts: text must be valid Unicode.

    JSON may spell a lone surrogate (``"\\ud800"``), which no UTF-8 encoder, tokenizer
    or database takes; such a body is a 400 here rather than a 500 deep inside."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if _has_lone_surrogate(data):
            raise ValueError("text must be valid Unicode (a lone surrogate escape was sent)")
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _GenerationBody(RequestBody):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = Field(default=None, max_length=256)
    max_price_per_mtok: int | None = Field(default=None, ge=0, le=MAX_PRICE)
    presence_penalty: float | None = Field(default=None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    frequency_penalty: float | None = Field(default=None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    # token id (as a JSON string key) → bias; ids are checked against the model's vocabulary
    logit_bias: dict[str, float] | None = Field(default=None,
                                                max_length=MAX_LOGIT_BIAS_ENTRIES)

    kind: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _served_parameters(cls, data: Any) -> Any:
        """400 for a parameter the market would otherwise ignore (module doc)."""
        if isinstance(data, dict):
            parameters.check(cls.kind, data)
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        items = [value] if isinstance(value, str) else value or []
        if any(len(s) > 256 for s in items):
            raise ValueError("a stop sequence is at most 256 characters")
        return value

    @model_validator(mode="after")
    def _streamed_choices(self) -> Any:
        """Streamed choices come interleaved as plain text deltas: not with tools (read
        as a whole at the end) or logprobs."""
        logprobs = getattr(self, "logprobs", None)
        if self.n > 1 and self.stream and (getattr(self, "tools", None) or (
                logprobs is not None and logprobs is not False)):
            raise PydanticCustomError(
                "unsupported_parameter", "n > 1 with stream is served without tools and "
                "logprobs (ask without stream for those)", {"param": "n"})
        return self

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias key {key!r} is not a token id")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias[{key}] must be in [-{LOGIT_BIAS_LIMIT:g}, "
                                 f"{LOGIT_BIAS_LIMIT:g}]")
        return value

    def job_request(self, default_max_tokens: int) -> JobRequest:
        """The job this body asks for, read once (``protocol.job`` holds the defaults);
        raises ``protocol.job.InvalidJobRequest``."""
        return JobRequest.from_openai(
            self.kind, self.model_dump(mode="json", exclude_none=True), default_max_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    # text, json_object or json_schema (read by protocol.job: OutputConstraint)
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # functions the model may call (read by protocol.job / protocol.tools)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; one call per answer is rendered

    kind: ClassVar[str] = "chat"

    def tool_setup(self) -> tuple[ToolMode, list[Tool]]:
        """How this request's output is read back: the tool mode and the tools."""
        offered = parse_tools(self.tools)
        return tool_mode(self.tool_choice, offered)[0], offered

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @model_validator(mode="before")
    @classmethod
    def _served_messages(cls, data: Any) -> Any:
        """400 for tool calls, tool results and non-text parts (not served yet)."""
        if isinstance(data, dict):
            parameters.check_messages(data.get("messages"))
        return data

    def prompt_chars(self) -> int:
        total = 0
        for m in self.messages:
            if isinstance(m.content, str):
                total += len(m.content)
            elif m.content:
                total += sum(len(str(part.get("text", ""))) for part in m.content)
        return total


class CompletionRequest(_GenerationBody):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    # the prompt comes back before the completion (its own tokens are not re-scored:
    # with logprobs it is refused rather than answered without the prompt's)
    echo: bool = False

    kind: ClassVar[str] = "completion"

    @field_validator("echo")
    @classmethod
    def _echo_without_logprobs(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("logprobs") is not None:
            raise PydanticCustomError(
                "unsupported_parameter", "echo with logprobs is not served (the prompt's "
                "tokens are not scored); ask for one of them", {"param": "echo"})
        return value

    @property
    def echoed(self) -> str:
        """What comes before the completion's text: the prompt when ``echo`` is set."""
        return str(self.prompt) if self.echo else ""

    @model_validator(mode="after")
    def _single_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("prompt: one prompt per request (use /v1/batch for several)")
            self.prompt = self.prompt[0]
        return self

    def prompt_chars(self) -> int:
        return len(self.prompt)


GenerationRequestBody = ChatCompletionRequest | CompletionRequest


class EmbeddingRequestBody(RequestBody):
    """``POST /v1/embeddings``: ``input`` is read by ``protocol.embedding`` (texts only)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    # the model's own width only: no node here shortens vectors (checked by the route)
    dimensions: int | None = Field(default=None, ge=1, le=65_536)
    user: str | None = Field(default=None, max_length=256)
    max_price_per_mtok: int | None = Field(default=None, ge=0, le=MAX_PRICE)

    @model_validator(mode="before")
    @classmethod
    def _served_parameters(cls, data: Any) -> Any:
        if isinstance(data, dict):
            parameters.check("embedding", data)
        return data


def embedding_response(model: str, vectors: Sequence[Sequence[float]],
                       encoding: Literal["float", "base64"], prompt_tokens: int) -> bytes:
    """OpenAI's embeddings list as JSON bytes: one ``embedding`` object per input, in
    order. Floats are written with the 9 significant digits that round-trip a float32
    (not float64's 17): megabytes of vectors are built as text directly, and the
    caller runs this off the event loop."""
    head = json.dumps({"object": "list", "data": "\x00", "model": model,
                       "usage": {"prompt_tokens": prompt_tokens,
                                 "total_tokens": prompt_tokens}}, separators=(",", ":"))
    before, _, after = head.partition('"\\u0000"')
    items = []
    for index, vector in enumerate(vectors):
        value = (f'"{vector_base64(vector)}"' if encoding == "base64"
                 else "[" + ",".join(format(x, ".9g") for x in vector) + "]")
        items.append(f'{{"object":"embedding","index":{index},"embedding":{value}}}')
    return (before + "[" + ",".join(items) + "]" + after).encode()


class BatchRequest(RequestBody):
    """Several prompts (completions) or conversations (chat) with shared parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompts: list[str] | None = None
    conversations: list[Annotated[list[ChatMessage], Field(min_length=1)]] | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    max_price_per_mtok: int | None = Field(default=None, ge=0, le=MAX_PRICE)

    @model_validator(mode="before")
    @classmethod
    def _served_messages(cls, data: Any) -> Any:
        conversations = data.get("conversations") if isinstance(data, dict) else None
        for k, messages in enumerate(conversations if isinstance(conversations, list) else ()):
            try:
                parameters.check_messages(messages)
            except PydanticCustomError as exc:
                context = dict(exc.context or {})
                context["param"] = f"conversations[{k}].{context.get('param')}"
                raise PydanticCustomError(exc.type, exc.message_template, context) from None
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> BatchRequest:
        if (self.prompts is None) == (self.conversations is None):
            raise ValueError("give exactly one of 'prompts' or 'conversations'")
        items = self.prompts if self.prompts is not None else self.conversations
        if not items:
            raise ValueError("a batch needs at least one item")
        if len(items) > 256:
            raise ValueError("at most 256 items per batch")
        return self

    def items(self) -> list[GenerationRequestBody]:
        """One body per item; an item its endpoint refuses is a 400 (raises ``APIError``)."""
        shared = self.model_dump(
            include={"model", "max_tokens", "temperature", "top_p", "seed", "stop",
                     "max_price_per_mtok"},
            exclude_none=True,
        )
        try:
            if self.prompts is not None:
                return [CompletionRequest(prompt=p, **shared) for p in self.prompts]
            assert self.conversations is not None
            return [ChatCompletionRequest(messages=c, **shared) for c in self.conversations]
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None


# ---- responses ------------------------------------------------------------------------


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


Piece = Callable[[int], bytes]


def _token_text(piece: Piece, token: int) -> tuple[str, list[int]]:
    raw = piece(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(entries: Sequence[TokenLogprob], piece: Piece) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object: each token's text, bytes, log-probability and
    its ``top_logprobs``."""
    content = []
    for entry in entries:
        text, raw = _token_text(piece, entry.token_id)
        top = []
        for token, logprob in entry.top:
            top_text, top_raw = _token_text(piece, token)
            top.append({"token": top_text, "logprob": logprob, "bytes": top_raw})
        content.append({"token": text, "logprob": entry.logprob, "bytes": raw,
                        "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], piece: Piece,
                        text_offset: int = 0) -> dict[str, Any]:
    """The completions endpoint's (legacy) ``logprobs`` object."""
    tokens, offsets, top = [], [], []
    offset = text_offset
    for entry in entries:
        text, _ = _token_text(piece, entry.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top.append({_token_text(piece, t)[0]: lp for t, lp in entry.top})
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def logprobs_object(kind: str, entries: Sequence[TokenLogprob] | None, piece: Piece,
                    text_offset: int = 0) -> dict[str, Any] | None:
    if entries is None:
        return None
    if kind == "chat":
        return chat_logprobs(entries, piece)
    return completion_logprobs(entries, piece, text_offset)


def completion_response(
    kind: str, response_id: str, model: str, text: str, finish_reason: str, usage: dict[str, int],
    created: int | None = None, logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    created = created or int(time.time())
    if kind == "chat":
        return {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
        "usage": usage,
    }


def stream_chunk(
    kind: str,
    response_id: str,
    model: str,
    created: int,
    text: str | None,
    finish_reason: str | None = None,
    *,
    first: bool = False,
    usage: dict[str, int] | None = None,
    no_choices: bool = False,
    usage_field: bool = False,
    logprobs: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One streamed chunk (of choice ``index``). ``usage_field``: the stream asked for usage
    (``include_usage``), so every chunk has the field, null but on the usage-only chunk
    (``no_choices``) that ends the stream, as OpenAI sends; without it no chunk has one."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_calls is not None:
            delta["tool_calls"] = tool_calls
        choice: dict[str, Any] = {
            "index": index, "delta": delta, "logprobs": logprobs,
            "finish_reason": finish_reason
        }
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs,
                  "finish_reason": finish_reason}
        obj = "text_completion"
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [] if no_choices else [choice],
    }
    if usage is not None or usage_field:
        chunk["usage"] = usage
    return chunk
