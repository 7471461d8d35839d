"""Which OpenAI request parameters the market serves, and the 400 for every other one.

An OpenAI client that sends ``tools`` or ``response_format`` and gets a 200 that
ignored them breaks silently (a tool call never comes, ``with_structured_output``
returns None), so a body is checked against OpenAI's own parameter list for its
endpoint before anything else: a parameter the market serves passes; one it does not
serve yet passes only at the value that means "off" (``presence_penalty: 0``,
``logprobs: false``, ``n: 1``…: what SDKs send as defaults); any other value is 400
``unsupported_parameter`` naming it; a name OpenAI does not define is 400
``unknown_parameter``, as OpenAI answers. ``None`` is "not given" everywhere.

Chat messages are held to the same rule (:func:`check_messages`): tool calls, tool
results and content parts other than text are refused by name until they are served.

The README's table of supported parameters is this module's ``SERVED`` and
``OFF_VALUES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticCustomError

# served as OpenAI defines them (typed fields of market.api.schemas), both endpoints
_SERVED_BOTH = frozenset({
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "n",
    # the market's own: the buyer's price cap per million tokens
    "max_price_per_mtok",
})
# accepted and without effect on the output (bookkeeping fields of OpenAI's API)
_NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                        "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"})

SERVED: dict[str, frozenset[str]] = {
    "chat": _SERVED_BOTH | _NO_EFFECT | {"messages", "max_completion_tokens",
                                         "response_format", "logprobs", "top_logprobs",
                                         "tools", "tool_choice", "parallel_tool_calls"},
    "completion": _SERVED_BOTH | {"prompt", "user", "logprobs", "echo"},
    # dimensions: only the model's own width (checked against the nodes' offers)
    "embedding": frozenset({"model", "input", "encoding_format", "dimensions", "user",
                            "max_price_per_mtok"}),
    # mapped onto the chat job (market.api.responses)
    "responses": frozenset({"model", "input", "instructions", "max_output_tokens",
                            "temperature", "top_p", "stream", "tools", "tool_choice",
                            "parallel_tool_calls", "text", "max_price_per_mtok"})
    | _NO_EFFECT,
}

_OFF_BOTH: dict[str, tuple[Any, ...]] = {}
# not served yet: the values that ask for nothing (0 == 0.0 and False == 0 compare equal)
OFF_VALUES: dict[str, dict[str, tuple[Any, ...]]] = {
    "chat": {
        **_OFF_BOTH,
        "functions": ([],),
        "function_call": ("none", "auto"),
        "modalities": (["text"],),
        "audio": (),
        "prediction": (),
        "reasoning_effort": (),
        "verbosity": (),
        "web_search_options": (),
        "moderation": (),
    },
    "completion": {
        **_OFF_BOTH,
        "best_of": (1,),
        "suffix": ("",),
    },
    "embedding": {},
    "responses": {
        # nothing is stored: no earlier response or conversation to continue
        "previous_response_id": (), "conversation": (), "prompt": (),
        "background": (False,), "background_options": (), "include": ([],),
        "truncation": ("disabled",), "reasoning": (), "top_logprobs": (0,),
        "max_tool_calls": (), "stream_options": (), "context_management": (),
        "moderation": (), "access_programs": (), "image": (),
    },
}


def _same(value: Any, off: Any) -> bool:
    """Equal and of a compatible type: ``True`` is not the ``1`` of ``n: 1``."""
    if isinstance(value, bool) != isinstance(off, bool):
        return False
    return bool(value == off)


def check(kind: str, body: Mapping[str, Any]) -> None:
    """Raise ``PydanticCustomError`` (``unknown_parameter`` / ``unsupported_parameter``,
    with the parameter's name in ``ctx["param"]``) for the first parameter of ``body``
    the market does not serve as asked."""
    served, off = SERVED[kind], OFF_VALUES[kind]
    for name, value in body.items():
        if name in served:
            continue
        if name in off:
            if value is None or any(_same(value, v) for v in off[name]):
                continue
            raise PydanticCustomError(
                "unsupported_parameter",
                "'{param}' is not supported by this market yet (only its default is "
                "accepted; the README lists the supported parameters)",
                {"param": name},
            )
        raise PydanticCustomError(
            "unknown_parameter", "Unrecognized request argument supplied: {param}",
            {"param": name})


# message fields and roles the market renders; the rest are tools, audio or vision
_MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_MESSAGE_OFF: dict[str, tuple[Any, ...]] = {"function_call": (), "audio": (), "refusal": ()}
# tool calls and results are rendered into the prompt (protocol.tools)
_MESSAGE_SERVED = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


def check_messages(messages: Any) -> None:
    """Raise ``PydanticCustomError`` for the first message part the market would drop: a
    legacy ``function_call`` or role ``function`` (``unsupported_parameter``), or a
    content part that is not text (``unsupported_content``); ``param`` is its path
    (``messages[2].function_call``)."""
    if not isinstance(messages, list):
        return  # the field's own validation says what is wrong
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return
        role = message.get("role")
        if role not in _MESSAGE_ROLES and isinstance(role, str):
            _unsupported(f"messages[{i}].role", f"messages with role '{role}' are not "
                         "supported (tool results are role 'tool', with tool_call_id)")
        for name, value in message.items():
            if name in _MESSAGE_SERVED or value is None:
                continue
            if name not in _MESSAGE_OFF or not any(_same(value, v) for v in _MESSAGE_OFF[name]):
                _unsupported(f"messages[{i}].{name}",
                             f"'{name}' in messages is not supported by this market yet")
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text":
                raise PydanticCustomError(
                    "unsupported_content",
                    "content parts of type '{kind}' are not served (text only: no node "
                    "here serves a multimodal model)",
                    {"param": f"messages[{i}].content[{j}].type", "kind": str(kind)})


def _unsupported(param: str, message: str) -> None:
    raise PydanticCustomError("unsupported_parameter", message + " ({param})",
                              {"param": param})
