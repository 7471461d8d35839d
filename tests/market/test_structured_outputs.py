"""Structured outputs, logprobs, penalties and logit_bias through the market, with a
real llama.cpp node and the ``openai`` SDK as the buyer.

``response_format`` output parses (the SDK's own ``parse`` with a pydantic model); a
node that declares constrained decoding but ignores it is refused as its first token
is relayed (the market holds the same grammar); logprobs come in OpenAI's shape, in
full responses and streamed; ``/v1/models/{id}`` says which nodes serve what."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from inference.llamacpp import LlamaCppEngine, default_gguf
from tests.support.market import Buyer, Market, Nodes, unique_model
from tests.verification.cheaters import ShapingIgnoringEngine

N_CTX = 2048
ASK = [{"role": "user", "content": "Describe a person named Ada who lives in Paris."}]


class Person(BaseModel):
    name: str
    age: int
    city: str


async def _serve(market: Market, nodes: Nodes, *, ignoring: bool = False) -> str:
    """A llama.cpp node on a freshly listed copy of SmolLM2 (its GGUF vocabulary)."""
    model = unique_model("smol")
    engine: Any = LlamaCppEngine(model_id=model, n_ctx=N_CTX, n_threads=2)
    if ignoring:
        engine = ShapingIgnoringEngine(engine)
    await engine.start()
    market.list_model(model, engine.model.sha256, vocabulary=f"gguf:{default_gguf()}",
                      context_length=N_CTX)
    await nodes.start(model, engine=engine)
    return model


async def test_response_format_json_schema_parses_with_the_sdk(buyer: Buyer, market: Market,
                                                               nodes: Nodes) -> None:
    model = await _serve(market, nodes)
    client = buyer.client()
    reply = await client.chat.completions.parse(
        model=model, messages=ASK, response_format=Person, temperature=0.7, seed=4,
        max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Person)
    # json_object: any JSON object, streamed
    stream = await client.chat.completions.create(
        model=model, messages=ASK, response_format={"type": "json_object"}, temperature=0,
        max_tokens=60, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert isinstance(json.loads(text), dict)
    card = buyer.get(f"/v1/models/{model}")
    assert card["capabilities"] == {"response_format": 1, "logit_bias": 1, "logprobs": 1}


async def test_a_node_ignoring_the_constraint_is_refused_at_the_relay(
        buyer: Buyer, market: Market, nodes: Nodes) -> None:
    model = await _serve(market, nodes, ignoring=True)
    with pytest.raises(openai.APIStatusError) as info:
        await buyer.client().chat.completions.create(
            model=model, messages=ASK, response_format={"type": "json_object"},
            temperature=0, max_tokens=30)
    assert info.value.status_code == 503  # no other node could take it
    assert "grammar_violation" in info.value.response.json()["error"]["message"]
    # the same node serves an unconstrained job (it follows everything else)
    reply = await buyer.client().chat.completions.create(
        model=model, messages=ASK, temperature=0, max_tokens=8)
    assert reply.usage is not None and reply.usage.completion_tokens == 8


async def test_a_schema_no_grammar_compiles_is_400(buyer: Buyer, market: Market,
                                                   nodes: Nodes) -> None:
    model = await _serve(market, nodes)
    with pytest.raises(openai.BadRequestError) as info:
        await buyer.client().chat.completions.create(
            model=model, messages=ASK, max_tokens=8, response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object",
                                                        "properties": {"a": {"type": 7}}}}})
    assert info.value.response.json()["error"]["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        await buyer.client().chat.completions.create(
            model=model, messages=ASK, max_tokens=8, logit_bias={"49152": 5})
    assert info.value.response.json()["error"]["param"] == "logit_bias"  # past the vocabulary


async def test_logprobs_in_openai_shape_full_and_streamed(buyer: Buyer, market: Market,
                                                          nodes: Nodes) -> None:
    model = await _serve(market, nodes)
    client = buyer.client()
    reply = await client.chat.completions.create(
        model=model, messages=ASK, temperature=0, max_tokens=12, logprobs=True,
        top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens == 12
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert token.top_logprobs[0].token == token.token
        assert bytes(token.bytes).decode() == token.token
    stream = await client.chat.completions.create(
        model=model, messages=ASK, temperature=0, max_tokens=12, logprobs=True,
        top_logprobs=1, stream=True)
    streamed = [t async for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [round(t.logprob, 4) for t in streamed] == [round(t.logprob, 4) for t in content]
    legacy = await client.completions.create(model=model, prompt="The cat sat on the",
                                             temperature=0, max_tokens=6, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(top) == 2 for top in lp.top_logprobs)


async def test_logit_bias_and_penalties_reach_the_node(buyer: Buyer, market: Market,
                                                       nodes: Nodes) -> None:
    model = await _serve(market, nodes)
    client = buyer.client()
    forced = await client.completions.create(model=model, prompt="The cat sat on the",
                                             temperature=1, max_tokens=5, logit_bias={"28": 100})
    assert forced.choices[0].text == "," * 5  # token 28 is ","
    prompt = "List of fruits: apple, banana, apple, banana,"
    plain = await client.completions.create(model=model, prompt=prompt, temperature=0,
                                            max_tokens=24)
    penalised = await client.completions.create(model=model, prompt=prompt, temperature=0,
                                                max_tokens=24, frequency_penalty=1.5)
    assert penalised.choices[0].text != plain.choices[0].text


async def test_n_choices_draw_their_own_noise(buyer: Buyer, market: Market,
                                              nodes: Nodes) -> None:
    model = await _serve(market, nodes)
    client = buyer.client()
    three = await client.chat.completions.create(model=model, messages=ASK, temperature=1,
                                                 seed=5, max_tokens=10, n=3)
    one = await client.chat.completions.create(model=model, messages=ASK, temperature=1,
                                               seed=5, max_tokens=10)
    texts = [c.message.content for c in three.choices]
    assert texts[0] == one.choices[0].message.content  # choice 0 keeps the buyer's seed
    assert len(set(texts)) == 3


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                              "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


async def test_required_tool_call_is_a_valid_call_full_and_streamed(
        buyer: Buyer, market: Market, nodes: Nodes) -> None:
    model = await _serve(market, nodes)
    client = buyer.client()
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = await client.chat.completions.create(
            model=model, messages=ASK_WEATHER, tools=WEATHER, tool_choice=choice,
            temperature=0, max_tokens=40)
        answer = reply.choices[0]
        assert answer.finish_reason == "tool_calls", answer.message.content
        (call,) = answer.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert set(json.loads(call.function.arguments)) == {"city"}
        assert call.id.startswith("call_")
    stream = await client.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=WEATHER, tool_choice="required",
        temperature=0, max_tokens=40, stream=True)
    chunks = [c async for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_weather"]
    assert json.loads(deltas[0].function.arguments) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the agent's next turn: its call and the tool's result go back into the prompt
    follow = await client.chat.completions.create(
        model=model, tools=WEATHER, temperature=0, max_tokens=16, messages=[
            *ASK_WEATHER,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


async def test_bad_tools_are_400_naming_the_field(buyer: Buyer, market: Market,
                                                  nodes: Nodes) -> None:
    model = await _serve(market, nodes)
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools[0].function.name"),
        ({"tools": WEATHER, "tool_choice": {"type": "function",
                                            "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": WEATHER, "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "response_format"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await buyer.client().chat.completions.create(
                model=model, messages=ASK_WEATHER, max_tokens=8, extra_body=extra)
        assert info.value.response.json()["error"]["param"] == param, extra
