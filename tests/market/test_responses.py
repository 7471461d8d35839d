"""``POST /v1/responses`` through the real ``openai`` SDK: text and streamed events on the
deterministic engine (its exact output known), function calls and structured text on a
real llama.cpp node, and a 400 naming whatever the market does not serve."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.market import Buyer, Market, Nodes, expected_output, serve_smol, unique_model



async def test_text_in_and_out(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    client = buyer.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text, ids = await expected_output("chat", model, 8, messages=messages)
    reply = await client.responses.create(model=model, instructions="Be brief.", input="hi",
                                          max_output_tokens=8)
    assert reply.output_text == text
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == len(ids) == 8
    assert reply.output[0].type == "message" and reply.output[0].role == "assistant"
    # the same turns as items with text parts
    items = await client.responses.create(model=model, max_output_tokens=8, input=[
        {"role": "system", "content": [{"type": "input_text", "text": "Be brief."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    assert items.output_text == text
    assert items.id.startswith("resp_") and items.id != reply.id


async def test_streamed_events_in_order(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    text, _ = await expected_output("chat", model, 10,
                                    messages=[{"role": "user", "content": "hello"}])
    stream = await buyer.client().responses.create(model=model, input="hello",
                                                   max_output_tokens=10, stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 10


@pytest.mark.parametrize("extra, param, code", [
    ({"previous_response_id": "resp_x"}, "previous_response_id", "unsupported_parameter"),
    ({"background": True}, "background", "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_parameter"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "unsupported_content"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type",
     "unsupported_parameter"),
    ({"temprature": 1}, "temprature", "unknown_parameter"),
    ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
])
async def test_what_is_not_served_is_400_naming_it(buyer: Buyer, nodes: Nodes, extra: dict,
                                                   param: str, code: str) -> None:
    model = unique_model()
    await nodes.start(model)
    async with httpx.AsyncClient(base_url=buyer.market.url, timeout=30,
                                 headers={"Authorization": f"Bearer {buyer.key}"}) as client:
        response = await client.post("/v1/responses",
                                     json={"model": model, "input": "hi", **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error


# ---- on a real model -------------------------------------------------------------------------


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}


@pytest.mark.weights
async def test_function_calls_and_their_outputs(buyer: Buyer, market: Market,
                                                nodes: Nodes) -> None:
    model = await serve_smol(market, nodes)
    client = buyer.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = await client.responses.create(model=model, input=ask, tools=[WEATHER],
                                          tool_choice="required", max_output_tokens=60,
                                          temperature=0)
    calls = [item for item in reply.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert set(json.loads(calls[0].arguments)) == {"city"}
    # the call and its output go back as input items; the model answers in text
    follow = await client.responses.create(model=model, tools=[WEATHER], max_output_tokens=20,
                                           temperature=0, input=[
        *ask, {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
               "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert follow.output_text
    # streamed: the call arrives as its own item with its arguments
    stream = await client.responses.create(model=model, input=ask, tools=[WEATHER],
                                           tool_choice={"type": "function",
                                                        "name": "get_weather"},
                                           max_output_tokens=60, temperature=0, stream=True)
    events = [e async for e in stream]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == calls[0].arguments
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[-1].type == "function_call"


@pytest.mark.weights
async def test_structured_text_parses(buyer: Buyer, market: Market, nodes: Nodes) -> None:
    model = await serve_smol(market, nodes)
    # greedy (the Responses API has no seed: a sampled run could spend its tokens inside
    # a string), and room enough for two 24-character strings of any tokens
    parsed = await buyer.client().responses.parse(
        model=model, input="Name a city and its country.", text_format=City,
        max_output_tokens=200, temperature=0)
    assert parsed.status == "completed", parsed.output_text
    assert isinstance(parsed.output_parsed, City)


async def test_a_failed_job_is_a_failed_response(buyer: Buyer, nodes: Nodes) -> None:
    with pytest.raises(openai.NotFoundError):
        await buyer.client().responses.create(model="nobody-serves-this", input="hi")
    model: Any = unique_model()
    await nodes.start(model)
    with pytest.raises(openai.BadRequestError) as info:
        await buyer.client().responses.create(model=model, input="hi",
                                              text={"format": {"type": "json_object"}})
    assert info.value.response.json()["error"]["param"] == "text.format"
