"""The job contract: what a buyer asked for, in the one typed form every party uses.

The market builds a :class:`JobRequest` once from the buyer's OpenAI body
(:meth:`JobRequest.from_openai`), sends it on the node link, stores it with the job and
hands it to the verifier; engines get it through ``inference.convert.engine_request``.
The defaults below are written here only, because the signed receipt attests the
sampling parameters and the request digest: a default restated elsewhere could drift
and turn honest receipts into mismatches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from protocol import tools
from protocol.canonical import canonical_json, digest_json

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
DEFAULT_TOP_P = 1.0  # OpenAI's default
# OpenAI's ranges: penalties in [-2, 2], a logit bias in [-100, 100]
PENALTY_LIMIT = 2.0
LOGIT_BIAS_LIMIT = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_TOP_LOGPROBS = 20  # OpenAI's top_logprobs maximum
# a response_format schema is compiled into a grammar by every party: bounded
MAX_SCHEMA_BYTES = 64 * 1024

JobKind = Literal["chat", "completion"]
# "cancelled": the market sent ``cancel``; the receipt covers what was produced by then
FinishReason = Literal["stop", "length", "cancelled"]


class InvalidJobRequest(ValueError):
    """An OpenAI body that no engine can serve (a 400 at the market; ``param`` names the
    field at fault where one does)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
    # applied to the logits before the protocol sampler (inference.shaping), OpenAI's
    # way: bias added; count·frequency + presence subtracted for tokens already output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def shaped(self) -> bool:
        """Whether the logits are changed before sampling (penalties or bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @model_serializer(mode="wrap")
    def _omit_unshaped(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The shaping fields only when set: an unshaped job's stored form, wire frame
        and receipt hash are what they were before the fields existed."""
        return _without_defaults(handler(self), _SHAPING_FIELDS)


_SHAPING_FIELDS: dict[str, Any] = {"presence_penalty": 0.0, "frequency_penalty": 0.0,
                                   "logit_bias": ()}


def _is_default(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return value is default
    if isinstance(default, tuple):  # () dumps as [] in JSON mode
        return isinstance(value, list | tuple) and not value
    return bool(value == default)


def _without_defaults(data: Any, defaults: Mapping[str, Any]) -> Any:
    if isinstance(data, dict):
        for name, default in defaults.items():
            if name in data and _is_default(data[name], default):
                del data[name]
    return data


class OutputConstraint(_Strict):
    """What the output must be, enforced by constrained decoding (``inference.grammar``):
    any JSON object (``json_object``) or JSON valid against ``json_schema``. Part of the
    request digest: a node that ignored it signed a request it did not serve."""

    type: Literal["json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None
    name: str | None = None  # OpenAI's response_format.json_schema.name, informative

    @model_validator(mode="after")
    def _schema_given(self) -> OutputConstraint:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("a json_schema constraint has a schema, json_object none")
        schema = self.json_schema
        if schema is not None and len(canonical_json(schema)) > MAX_SCHEMA_BYTES:
            raise ValueError(f"the JSON schema is over {MAX_SCHEMA_BYTES // 1024} KiB")
        return self

    def digest_value(self) -> dict[str, Any]:
        return {"type": self.type, "json_schema": self.json_schema}


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
    constraint: OutputConstraint | None = None
    # return log-probabilities: None no; k >= 0: the chosen token's and the top k
    logprobs: int | None = None

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No constraint and no logprobs leave no trace (as for the shaping fields)."""
        return _without_defaults(handler(self), {"constraint": None, "logprobs": None})

    @model_validator(mode="after")
    def _consistent(self) -> JobRequest:
        if self.kind == "chat" and (not self.messages or self.prompt is not None):
            raise ValueError("a chat job has messages (at least one) and no prompt")
        if self.kind == "completion" and (self.prompt is None or self.messages is not None):
            raise ValueError("a completion job has a prompt and no messages")
        s = self.sampling
        if s.max_tokens < 0 or s.temperature < 0 or not 0 < s.top_p <= 1:
            raise ValueError("max_tokens >= 0, temperature >= 0 and 0 < top_p <= 1")
        _check_shaping(s)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        return self

    @property
    def input(self) -> list[dict[str, str]] | str:
        """The prompt as the digest and chat templates take it."""
        if self.kind == "chat":
            return [{"role": m.role, "content": m.content} for m in self.messages or []]
        return self.prompt or ""

    @property
    def shaped(self) -> bool:
        """Whether the logits are changed before sampling (``inference.shaping``)."""
        return self.sampling.shaped or self.constraint is not None

    def digest(self, continuation_token_ids: Sequence[int] = ()) -> str:
        """The receipt's ``request_sha256`` for this job given ``continuation_token_ids``."""
        return request_digest(self.kind, self.input, continuation_token_ids, self.constraint)

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
        newlines, as vLLM joins them; ``logit_bias`` maps token ids (as JSON's string
        keys) to biases; ``response_format`` becomes the output constraint; chat's
        ``logprobs``/``top_logprobs`` and completions' ``logprobs: k`` become
        ``logprobs``. The model and field bounds are the market's to check.
        """
        constraint = None
        if kind == "chat":
            turns, prompt = _chat_turns(body.get("messages")), None
            turns, constraint = _with_tools(turns, body)
        elif kind == "completion":
            turns, prompt = None, _completion_prompt(body.get("prompt", ""))
        else:
            raise InvalidJobRequest(f"unknown kind {kind!r}")
        try:
            response_format = _constraint(body.get("response_format"))
            if constraint is not None and response_format is not None:
                raise InvalidJobRequest("a required tool call and a response_format cannot "
                                        "both constrain the output", "response_format")
            return cls(kind=kind, model=str(body.get("model") or ""), messages=turns,
                       prompt=prompt, sampling=_sampling(body, default_max_tokens),
                       constraint=constraint or response_format,
                       logprobs=_logprobs(kind, body))
        except InvalidJobRequest:
            raise
        except ValueError as exc:  # pydantic's ValidationError is one
            raise InvalidJobRequest(_first_error(exc)) from None


def _check_shaping(s: SamplingParams) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if not -PENALTY_LIMIT <= getattr(s, name) <= PENALTY_LIMIT:
            raise ValueError(f"{name} must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]")
    ids = [token for token, _ in s.logit_bias]
    if len(ids) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias holds at most {MAX_LOGIT_BIAS_ENTRIES} tokens")
    if ids != sorted(set(ids)) or (ids and ids[0] < 0):
        raise ValueError("logit_bias token ids are distinct, ascending and >= 0")
    if any(not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT for _, bias in s.logit_bias):
        raise ValueError(f"a logit_bias value must be in [-{LOGIT_BIAS_LIMIT:g}, "
                         f"{LOGIT_BIAS_LIMIT:g}]")


def request_digest(kind: str, request_input: str | Sequence[Mapping[str, Any]],
                   continuation_token_ids: Sequence[int] = (),
                   constraint: OutputConstraint | None = None) -> str:
    """Digest of what the model was asked: the prompt or the turns, plus any prefix.

    ``continuation_token_ids`` are the tokens earlier nodes produced when a job fails
    over mid-stream; the new node's receipt covers prompt + that prefix. Turns are
    reduced to role and content so extra client fields do not matter. A constraint is
    part of what was asked (absent from the digest when there is none, as before).
    """
    normalized: Any = request_input
    if kind == "chat":
        normalized = [{"role": m.get("role"), "content": m.get("content")}
                      for m in request_input]  # type: ignore[union-attr]
    value: dict[str, Any] = {"kind": kind, "input": normalized,
                             "continuation": list(continuation_token_ids)}
    if constraint is not None:
        value["constraint"] = constraint.digest_value()
    return digest_json(value)


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
    return [ChatTurn(role=str(m.get("role")),
                     content=message_text(m.get("content")) + _rendered_calls(m, i))
            for i, m in enumerate(raw)]


def _rendered_calls(message: Mapping[str, Any], index: int) -> str:
    """An assistant turn's earlier tool calls, as the model writes them (protocol.tools)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidJobRequest("tool_calls must be a list", f"messages[{index}].tool_calls")
    text = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidJobRequest("a tool call is {'type': 'function', 'function': "
                                    "{'name', 'arguments'}}", f"messages[{index}].tool_calls[{j}]")
        arguments: Any = function.get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # rendered as the string the client sent
        text.append(tools.render_call(function["name"], arguments))
    return "".join(text)


def _with_tools(turns: list[ChatTurn], body: Mapping[str, Any]
                ) -> tuple[list[ChatTurn], OutputConstraint | None]:
    """The turns with the offered tools in the system turn, and the constraint of a
    required call (``protocol.tools``)."""
    try:
        offered = tools.parse_tools(body.get("tools"))
        mode, only = tools.tool_mode(body.get("tool_choice"), offered)
    except tools.InvalidTools as exc:
        raise InvalidJobRequest(str(exc), exc.param) from None
    if mode == "none":
        return turns, None
    text = tools.tools_prompt(offered if only is None else
                              [t for t in offered if t.name == only], mode == "required")
    if turns[0].role == "system":
        turns = [ChatTurn(role="system", content=f"{turns[0].content}\n\n{text}"), *turns[1:]]
    else:
        turns = [ChatTurn(role="system", content=text), *turns]
    if mode != "required":
        return turns, None
    return turns, OutputConstraint(type="json_schema", name=tools.CONSTRAINT_NAME,
                                   json_schema=tools.call_schema(offered, only))


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
                          seed=seed, stop=_stop(body.get("stop")),
                          presence_penalty=_number(body, "presence_penalty", 0.0),
                          frequency_penalty=_number(body, "frequency_penalty", 0.0),
                          logit_bias=_logit_bias(body.get("logit_bias")))


def _logit_bias(raw: Any) -> tuple[tuple[int, float], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise InvalidJobRequest("logit_bias must map token ids to numbers")
    pairs: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidJobRequest(f"logit_bias key {key!r} is not a token id") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidJobRequest(f"logit_bias[{key}] must be a number")
        if value:
            pairs[token] = float(value)
    return tuple(sorted(pairs.items()))


def _constraint(raw: Any) -> OutputConstraint | None:
    """OpenAI's ``response_format``: text (no constraint), json_object or json_schema."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidJobRequest("response_format must be an object", "response_format")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputConstraint(type="json_object")
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise InvalidJobRequest(
                "response_format.json_schema must be an object with a 'schema' object",
                "response_format")
        name = spec.get("name")
        try:
            return OutputConstraint(type="json_schema",
                                    json_schema=dict(spec.get("schema") or {}),
                                    name=str(name) if name is not None else None)
        except ValueError as exc:  # the schema is over its size bound
            raise InvalidJobRequest(_first_error(exc), "response_format") from None
    raise InvalidJobRequest(
        "response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format")


def _logprobs(kind: str, body: Mapping[str, Any]) -> int | None:
    value = body.get("logprobs")
    if kind == "chat":
        if not value:
            return None
        top = body.get("top_logprobs") or 0
        if isinstance(top, bool) or not isinstance(top, int):
            raise InvalidJobRequest("top_logprobs must be an integer", "top_logprobs")
        return top
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidJobRequest("logprobs must be an integer", "logprobs")
    return value


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", exc)).removeprefix("Value error, ")
    return str(exc)
