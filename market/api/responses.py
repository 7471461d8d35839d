"""OpenAI's Responses API (``POST /v1/responses``) on the chat job path.

A Responses body is read once into the chat body it means (``ResponsesRequest.chat``):
``instructions`` become the system turn, ``input`` items become turns (messages,
earlier ``function_call`` items as assistant tool calls, ``function_call_output`` items
as tool results), function ``tools``/``tool_choice`` and ``text.format`` map onto
chat's ``tools``/``tool_choice``/``response_format``. The job then runs exactly as a
chat completion does (held, receipted, verified, billed), and its result is written
back in the Responses shape: ``message`` and ``function_call`` output items, streamed
as OpenAI's typed events (``response.created`` … ``response.output_text.delta`` …
``response.completed``).

Nothing is stored: ``previous_response_id``, ``conversation`` and background runs are
refused with a 400 naming them, as is every tool type other than functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, ValidationError, model_validator

from market.api import parameters
from market.api.openai import _END, complete, finished_tool_calls, job_order, next_event
from market.api.schemas import MAX_PRICE, MAX_TOKENS_LIMIT, ChatCompletionRequest, RequestBody
from market.api.sse import EventStreamResponse
from market.errors import APIError, BadRequest, validation_error
from market.gateway.auth import Buyer, authenticate, market_state
from market.gateway.session import JobSession
from market.gateway.state import MarketState
from market.metrics import endpoint_label

router = APIRouter()

# chat's names for what a Responses body calls otherwise (named back in a 400)
_PARAM_NAMES = {"messages": "input", "max_tokens": "max_output_tokens",
                "response_format": "text.format"}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ResponsesRequest(RequestBody):
    """A ``/v1/responses`` body (``market.api.parameters`` says which fields are served)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, Any] | None = None
    max_price_per_mtok: int | None = Field(default=None, ge=0, le=MAX_PRICE)

    @model_validator(mode="before")
    @classmethod
    def _served_parameters(cls, data: Any) -> Any:
        if isinstance(data, dict):
            parameters.check("responses", data)
        return data

    def chat(self) -> ChatCompletionRequest:
        """The chat body this request means (raises ``APIError`` naming this body's
        fields)."""
        body: dict[str, Any] = {"model": self.model, "messages": self._messages()}
        for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", None),
                             ("top_p", None), ("user", None),
                             ("max_price_per_mtok", None), ("parallel_tool_calls", None)):
            value = getattr(self, ours)
            if value is not None:
                body[theirs or ours] = value
        if self.tools is not None:
            body["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        response_format = _response_format(self.text)
        if response_format is not None:
            body["response_format"] = response_format
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            error = validation_error(exc.errors())
            raise BadRequest(str(error), param=self.param_name(error.param),
                             code=error.code) from None

    def param_name(self, param: str | None) -> str | None:
        """A parameter of the chat body, named as this body names it."""
        return _renamed(param, 1 if self.instructions else 0)

    def _messages(self) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = []
        if self.instructions:
            turns.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*turns, {"role": "user", "content": self.input}]
        for index, item in enumerate(self.input):
            turns.append(_turn(item, index))
        if not turns:
            raise BadRequest("input holds no message", param="input")
        return turns


def _renamed(param: str | None, shift: int = 0) -> str | None:
    """A chat parameter's name as this body spells it (``messages[3]`` is ``input[2]``
    when ``instructions`` took the first turn: ``shift`` 1)."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    name, bracket, tail = head.partition("[")
    if name == "messages" and bracket:
        index, _, after = tail.partition("]")
        if index.isdigit():
            tail = f"{max(0, int(index) - shift)}]{after}"
    return _PARAM_NAMES.get(name, name) + bracket + tail + dot + rest


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("content is a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
                part.get("text"), str):
            raise BadRequest(f"content parts of type {kind!r} are not served (text only: no "
                             "node here serves a multimodal model)",
                             param=f"{where}[{j}].type", code="unsupported_content")
        texts.append(part["text"])
    return "\n".join(texts)


def _turn(item: dict[str, Any], index: int) -> dict[str, Any]:
    """One ``input`` item as a chat message."""
    where = f"input[{index}]"
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise BadRequest("a message's role is user, system, developer or assistant",
                             param=f"{where}.role")
        return {"role": role, "content": _text_of(item.get("content"), f"{where}.content")}
    if kind == "function_call":
        if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
            raise BadRequest("a function_call item has a name and a call_id", param=where)
        arguments = item.get("arguments", "{}")
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": arguments}}]}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise BadRequest("a function_call_output item has a call_id", param=where)
        return {"role": "tool", "tool_call_id": item["call_id"],
                "content": _text_of(item.get("output", ""), f"{where}.output")}
    raise BadRequest(f"input items of type {kind!r} are not served (messages, function_call "
                     "and function_call_output are)", param=f"{where}.type",
                     code="unsupported_parameter")


def _chat_tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise BadRequest(f"tools of type {tool.get('type')!r} are not served (function tools "
                         "are)", param=f"tools[{index}].type", code="unsupported_parameter")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest("tool_choice is 'auto', 'none', 'required' or {'type': 'function', "
                     "'name': ...}", param="tool_choice", code="unsupported_parameter")


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    if not text or text.get("format") is None:
        return None
    spec = text["format"]
    if not isinstance(spec, dict):
        raise BadRequest("text.format must be an object", param="text.format")
    if spec.get("type") == "json_schema":
        schema = {k: spec[k] for k in ("name", "schema", "strict", "description") if k in spec}
        return {"type": "json_schema", "json_schema": schema}
    return spec  # text or json_object, as chat spells them


# ---- what comes back -------------------------------------------------------------------------


def _item_id(prefix: str, job_id: str) -> str:
    return f"{prefix}_{job_id.removeprefix('job_')}"


def _message_item(job_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": _item_id("msg", job_id), "status": status,
            "role": "assistant", "content": content if status == "completed" or text else []}


def _call_item(call: dict[str, Any], index: int, job_id: str) -> dict[str, Any]:
    function = call["function"]
    return {"type": "function_call", "id": _item_id(f"fc{index}", job_id),
            "call_id": call["id"], "name": function["name"],
            "arguments": function["arguments"], "status": "completed"}


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def _envelope(body: ResponsesRequest, job_id: str, created: int, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None,
              finish: str | None = None) -> dict[str, Any]:
    return {
        "id": _item_id("resp", job_id), "object": "response", "created_at": created,
        "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "model": body.model, "output": output,
        "parallel_tool_calls": True if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
        "store": False, "temperature": body.temperature, "top_p": body.top_p,
        "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "truncation": "disabled", "usage": usage, "user": body.user,
        "metadata": body.metadata or {},
    }


def response_object(body: ResponsesRequest, chat: dict[str, Any]) -> dict[str, Any]:
    """A finished chat completion in the Responses shape."""
    choice = chat["choices"][0]
    message = choice["message"]
    job_id = chat["id"].removeprefix("chatcmpl-")
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(_message_item(job_id, message["content"]))
    for index, call in enumerate(message.get("tool_calls") or []):
        output.append(_call_item(call, index, job_id))
    finish = choice["finish_reason"]
    usage = chat["usage"]
    return _envelope(body, job_id, chat["created"],
                     "incomplete" if finish == "length" else "completed", output,
                     _usage(usage["prompt_tokens"], usage["completion_tokens"]), finish)


class _Events:
    """Numbered Responses stream events, as SSE frames."""

    def __init__(self) -> None:
        self.sequence = 0

    def frame(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {_dumps(event)}\n\n"


async def _stream(state: MarketState, job: JobSession, events: AsyncIterator[str | None],
                  first: Any, body: ResponsesRequest, chat: ChatCompletionRequest,
                  endpoint: str, started: float) -> AsyncIterator[str]:
    runner = job.runner
    job_id = runner.spec.job_id
    created = int(time.time())
    out = _Events()
    item_id = _item_id("msg", job_id)
    # with tools the output is read as a whole (text or calls): held until the end
    holds = bool(chat.tools) and chat.tool_setup()[0] != "none"
    opened = False
    finished = False

    def open_message() -> list[str]:
        return [out.frame("response.output_item.added", output_index=0,
                          item=_message_item(job_id, "", "in_progress")),
                out.frame("response.content_part.added", item_id=item_id, output_index=0,
                          content_index=0, part={"type": "output_text", "text": "",
                                                 "annotations": [], "logprobs": []})]

    def close_message(text: str) -> list[str]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return [out.frame("response.output_text.done", item_id=item_id, output_index=0,
                          content_index=0, text=text, logprobs=[]),
                out.frame("response.content_part.done", item_id=item_id, output_index=0,
                          content_index=0, part=part),
                out.frame("response.output_item.done", output_index=0,
                          item=_message_item(job_id, text))]

    try:
        pending = _envelope(body, job_id, created, "in_progress", [], None)
        yield out.frame("response.created", response=pending)
        yield out.frame("response.in_progress", response=pending)
        event = first
        while event is not _END:
            if event is None or holds:
                yield ": keep-alive\n\n"
            else:
                if not opened:
                    opened = True
                    for frame in open_message():
                        yield frame
                yield out.frame("response.output_text.delta", item_id=item_id,
                                output_index=0, content_index=0, delta=event, logprobs=[])
            event = await next_event(events, runner)
        finished = True
        await job.finalize()
        if runner.error is not None:
            failed = _envelope(body, job_id, created, "failed", [], None)
            failed["error"] = {"code": runner.error.code or "server_error",
                               "message": str(runner.error)}
            yield out.frame("response.failed", response=failed)
            return
        text, calls = finished_tool_calls(chat, runner) if holds else (runner.text, [])
        output: list[dict[str, Any]] = []
        if text and not opened:
            opened = True
            for frame in open_message():
                yield frame
            yield out.frame("response.output_text.delta", item_id=item_id, output_index=0,
                            content_index=0, delta=text, logprobs=[])
        if opened:
            for frame in close_message(runner.text if not holds else text or ""):
                yield frame
            output.append(_message_item(job_id, runner.text if not holds else text or ""))
        for index, call in enumerate(calls):
            item = _call_item(call.openai(), index, job_id)
            position = len(output)
            yield out.frame("response.output_item.added", output_index=position,
                            item={**item, "arguments": "", "status": "in_progress"})
            yield out.frame("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=position, delta=item["arguments"])
            yield out.frame("response.function_call_arguments.done", item_id=item["id"],
                            output_index=position, arguments=item["arguments"],
                            name=item["name"])
            yield out.frame("response.output_item.done", output_index=position, item=item)
            output.append(item)
        finish = runner.finish_reason
        usage = runner.usage()
        done = _envelope(body, job_id, created, "incomplete" if finish == "length"
                         else "completed", output,
                         _usage(usage["prompt_tokens"], usage["completion_tokens"]), finish)
        yield out.frame("response.incomplete" if finish == "length" else "response.completed",
                        response=done)
        state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
    finally:
        if not finished:  # the buyer left: stop the node and bill what it produced
            state.spawn(job.abandon(events))


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request,
                          buyer: Buyer = Depends(authenticate)) -> Any:
    state = market_state(request)
    endpoint = endpoint_label(request.scope)
    started = time.monotonic()
    chat = body.chat()
    try:
        if not body.stream:
            result = response_object(body, await complete(state, buyer, chat))
            state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
            state.metrics.requests.labels(endpoint, "200").inc()
            return JSONResponse(result)
        job = await JobSession.open(state, buyer, job_order(chat, state.settings))
        events = job.runner.events()
        first = await job.guarded(events, anext(events, _END))  # errors keep their status
    except APIError as exc:  # named as the buyer named it
        exc.param = body.param_name(exc.param)
        raise
    state.metrics.requests.labels(endpoint, "200").inc()
    return EventStreamResponse(_stream(state, job, events, first, body, chat, endpoint,
                                       started),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["ResponsesRequest", "response_object", "router"]
