"""Tool calling as the protocol spells it: how OpenAI's ``tools`` become prompt text, how
a required call becomes an output constraint, and how output text becomes ``tool_calls``.

Chat templates of small models rarely know tools, and every party must render a job
the same way (the market counts the prompt, the node renders it, the verifier
re-renders it), so the rendering is fixed here, not left to a template: the tools go
into the system turn as JSON with an instruction to answer a call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes/Qwen
convention many open models were trained on); an assistant turn's earlier calls are
rendered the same way and a tool result is a turn of role ``tool``. The rendered turns
are the job's input, so the signed request digest covers the tools.

``tool_choice: "required"`` or a named function makes the output a call by
construction: the job's constraint (``protocol.job.OutputConstraint``) is the JSON
schema of ``{"name", "arguments"}`` over the allowed functions, and the whole output is
the call. ``auto`` leaves the model free; a ``<tool_call>`` block in its output is
parsed into ``tool_calls``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOOLS = 128
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)

ToolMode = Literal["none", "auto", "required"]
# the OutputConstraint.name of a required call (a schema error names ``tools`` then)
CONSTRAINT_NAME = "tool_call"


class InvalidTools(ValueError):
    """Tools or a tool choice the protocol cannot serve (a 400 at the market)."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


class Tool(BaseModel):
    """One function a model may call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=TOOL_NAME.pattern)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolCall(BaseModel):
    """A parsed call, as OpenAI returns it (``arguments`` is a JSON string)."""

    id: str
    name: str
    arguments: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            call["index"] = index
        return call


def parse_tools(raw: Any) -> list[Tool]:
    """OpenAI's ``tools`` list (functions only) as :class:`Tool` s."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise InvalidTools(f"tools must be a list of at most {MAX_TOOLS} functions")
    tools = []
    for i, item in enumerate(raw):
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(item, Mapping) or item.get("type") != "function" or not isinstance(
                function, Mapping):
            raise InvalidTools(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}",
                               f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidTools(f"tools[{i}].function.name must match {TOOL_NAME.pattern}",
                               f"tools[{i}].function.name")
        parameters = function.get("parameters") or {"type": "object"}
        if not isinstance(parameters, Mapping):
            raise InvalidTools(f"tools[{i}].function.parameters must be a JSON schema object",
                               f"tools[{i}].function.parameters")
        description = function.get("description") or ""
        tools.append(Tool(name=name, description=str(description), parameters=dict(parameters)))
    if len({t.name for t in tools}) != len(tools):
        raise InvalidTools("tool names must be distinct")
    return tools


def tool_mode(raw: Any, tools: Sequence[Tool]) -> tuple[ToolMode, str | None]:
    """(mode, the one function named) for OpenAI's ``tool_choice`` (default: ``auto``
    with tools, ``none`` without)."""
    if raw is None:
        return ("auto" if tools else "none"), None
    if raw in ("none", "auto", "required"):
        if raw == "required" and not tools:
            raise InvalidTools("tool_choice 'required' needs tools", "tool_choice")
        return raw if tools else "none", None  # type: ignore[return-value]
    function = raw.get("function") if isinstance(raw, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(raw, Mapping) or raw.get("type") != "function" or not isinstance(name, str):
        raise InvalidTools("tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if name not in {t.name for t in tools}:
        raise InvalidTools(f"tool_choice names '{name}', which is not among the tools",
                           "tool_choice")
    return "required", name


def tools_prompt(tools: Sequence[Tool], required: bool = False) -> str:
    """The system text that offers ``tools`` to the model (``required``: the answer is
    one call as bare JSON, which the output constraint then enforces)."""
    listed = "\n".join(json.dumps({"type": "function", "function": t.model_dump()},
                                  separators=(",", ":"), sort_keys=True) for t in tools)
    call = '{"name": <function name>, "arguments": <arguments object>}'
    how = (f"Answer with only the JSON object {call} of one call." if required else
           f"To call one, answer with only {CALL_OPEN}{call}{CALL_CLOSE}.")
    return ("You may call functions. The available functions, as JSON schemas:\n"
            f"<tools>\n{listed}\n</tools>\n{how}")


def render_call(name: str, arguments: Any) -> str:
    """An earlier call of an assistant turn, as the model is asked to write one."""
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments},
                                  separators=(",", ":"), ensure_ascii=False) + CALL_CLOSE


def call_schema(tools: Sequence[Tool], only: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call of the allowed functions (the output constraint of
    a required call)."""
    variants = [
        {"type": "object",
         "properties": {"name": {"const": t.name}, "arguments": t.parameters},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools if only is None or t.name == only
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def call_id(job_id: str, index: int) -> str:
    return "call_" + hashlib.sha256(f"{job_id}:{index}".encode()).hexdigest()[:24]


def parse_calls(text: str, mode: ToolMode, tools: Sequence[Tool], job_id: str
                ) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an output: for a required call the whole text is the call;
    for ``auto`` every well-formed ``<tool_call>`` block naming a known function is one,
    and the text before the first block is the content. Nothing parses: all content."""
    names = {t.name for t in tools}
    if mode == "none" or not tools:
        return text, []
    if mode == "required":
        call = _call(text, names, job_id, 0)
        return (None, [call]) if call else (text, [])
    calls = []
    for match in _CALL_BLOCK.finditer(text):
        call = _call(match.group(1), names, job_id, len(calls))
        if call is not None:
            calls.append(call)
    if not calls:
        return text, []
    head = text[: text.find(CALL_OPEN)].strip()
    return (head or None), calls


def _call(text: str, names: set[str], job_id: str, index: int) -> ToolCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    return ToolCall(id=call_id(job_id, index), name=value["name"],
                    arguments=json.dumps(arguments, separators=(",", ":"), ensure_ascii=False))
