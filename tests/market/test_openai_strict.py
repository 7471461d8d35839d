"""The buyer's API is strict about what it does not serve: every parameter the market
would ignore is a 400 naming it (OpenAI's ``invalid_request_error``), validation errors
are 400 with a ``code``, every response has an ``x-request-id``, and a stream's usage
comes once. Through the real ``openai`` SDK and raw HTTP against a running market."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from market.api import parameters
from tests.support.market import Buyer, Market, Nodes, unique_model

MESSAGES = [{"role": "user", "content": "tell me a story"}]


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


@pytest.mark.parametrize("extra,param", [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),  # legacy: use tools
    ({"function_call": {"name": "f"}}, "function_call"),
    # served by the market, but no node here declares it (the deterministic engine
    # declares no capabilities): the same 400, naming what the buyer asked for
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"modalities": ["text", "audio"]}, "modalities"),
])
async def test_an_unserved_parameter_is_400_naming_it(buyer: Buyer, nodes: Nodes, extra: dict,
                                                      param: str) -> None:
    model = unique_model()
    await nodes.start(model)
    with pytest.raises(openai.BadRequestError) as info:
        await buyer.client().chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=4, extra_body=extra)
    error = _error(info.value)
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == param


async def test_an_unknown_parameter_is_400_as_openai_answers(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    with pytest.raises(openai.BadRequestError) as info:
        await buyer.client().chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=4, extra_body={"temprature": 0.2})
    error = _error(info.value)
    assert (error["code"], error["param"]) == ("unknown_parameter", "temprature")
    assert "Unrecognized request argument supplied: temprature" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:
        await buyer.client().completions.create(
            model=model, prompt="hi", max_tokens=4, extra_body={"messages": MESSAGES})
    assert (_error(info.value)["code"], _error(info.value)["param"]) == (
        "unknown_parameter", "messages")  # a chat field on the completions endpoint


async def test_the_defaults_sdks_send_are_accepted(buyer: Buyer, nodes: Nodes) -> None:
    """Clients send "off" values of parameters the market does not serve yet
    (LangChain sends n=1, some SDKs presence_penalty=0): those change nothing."""
    model = unique_model()
    await nodes.start(model)
    reply = await buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, n=1, presence_penalty=0,
        frequency_penalty=0.0, logprobs=False, logit_bias={}, tool_choice="none",
        response_format={"type": "text"}, user="u1", metadata={"k": "v"}, store=False,
        parallel_tool_calls=True, extra_body={"top_logprobs": None})
    assert len(reply.choices) == 1
    assert reply.choices[0].finish_reason == "length"
    reply = await buyer.client().completions.create(
        model=model, prompt="hi", max_tokens=4, echo=False, best_of=1, n=1)
    assert reply.usage is not None and reply.usage.completion_tokens == 4


@pytest.mark.parametrize("body,code,param", [
    ({"messages": MESSAGES, "temperature": 7}, "invalid_value", "temperature"),
    ({"messages": MESSAGES, "max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"messages": []}, "invalid_value", "messages"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "invalid_value", "top_logprobs"),
    ({"messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, "invalid_value",
     "top_logprobs"),
    ({"messages": MESSAGES, "presence_penalty": 2.5}, "invalid_value", "presence_penalty"),
    ({"messages": MESSAGES, "logit_bias": {"7": 101}}, "invalid_value", "logit_bias"),
    ({"messages": MESSAGES, "logit_bias": {"x": 1}}, "invalid_value", "logit_bias"),
    ({}, "missing_required_parameter", "messages"),
])
async def test_validation_errors_are_400_with_a_code(buyer: Buyer, market: Market,
                                                     body: dict, code: str, param: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{market.api}/chat/completions", headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": "m", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)


async def test_batch_refuses_unknown_fields(buyer: Buyer, market: Market) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{market.api}/batch", headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": "m", "prompts": ["a"], "tools": []})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools"
    assert response.json()["error"]["code"] == "unknown_parameter"


@pytest.mark.parametrize("body, param", [
    ({"conversations": [[]]}, "conversations.0"),  # found by tests/market/test_openapi_fuzz.py
    ({"prompts": ["a"], "stop": ["1", "2", "3", "4", "5"]}, "stop"),
])
async def test_a_batch_item_its_endpoint_refuses_is_a_400(buyer: Buyer, market: Market,
                                                          body: dict, param: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(f"{market.api}/batch", json={"model": "m", **body},
                                     headers={"Authorization": f"Bearer {buyer.key}"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_every_response_has_a_request_id(buyer: Buyer, market: Market) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        ok = await client.get(f"{market.api}/models",
                              headers={"Authorization": f"Bearer {buyer.key}"})
        unauthorised = await client.get(f"{market.api}/models")  # refused by the gate
        echoed = await client.get(f"{market.api}/models", headers={
            "Authorization": f"Bearer {buyer.key}", "x-request-id": "client-trace.42"})
        hostile = await client.get(f"{market.api}/models", headers={
            "Authorization": f"Bearer {buyer.key}", "x-request-id": "a\tb" * 100})
    assert ok.headers["x-request-id"].startswith("req_")
    assert unauthorised.status_code == 401 and unauthorised.headers["x-request-id"]
    assert ok.headers["x-request-id"] != unauthorised.headers["x-request-id"]
    assert echoed.headers["x-request-id"] == "client-trace.42"
    assert hostile.headers["x-request-id"].startswith("req_")  # not echoed back


async def test_models_say_since_when(buyer: Buyer, nodes: Nodes) -> None:
    import time

    model = unique_model()
    before = int(time.time())
    await nodes.start(model)
    entry = next(m for m in (await buyer.client().models.list()).data if m.id == model)
    assert before - 1 <= entry.created <= int(time.time()) + 1


async def _events(market: Market, buyer: Buyer, body: dict) -> list[dict]:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{market.api}/chat/completions", headers={"Authorization": f"Bearer {buyer.key}"},
            json={**body, "stream": True})
    assert response.status_code == 200
    frames = [f for f in response.text.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[6:]) for f in frames[:-1]]


async def test_stream_usage_comes_once_on_its_own_chunk(buyer: Buyer, nodes: Nodes,
                                                        market: Market) -> None:
    model = unique_model()
    await nodes.start(model)
    body = {"model": model, "messages": MESSAGES, "max_tokens": 6}
    plain = await _events(market, buyer, body)
    assert all("usage" not in chunk for chunk in plain)  # not asked for: nowhere
    assert plain[-1]["choices"][0]["finish_reason"] == "length"
    counted = await _events(market, buyer, {**body, "stream_options": {"include_usage": True}})
    usages = [c["usage"] for c in counted if c["usage"] is not None]
    assert len(usages) == 1 and usages[0]["completion_tokens"] == 6
    assert counted[-1]["choices"] == [] and counted[-1]["usage"] == usages[0]
    assert all("usage" in c for c in counted)  # null on every other chunk, as OpenAI


def test_every_parameter_is_served_or_has_an_off_value() -> None:
    """One table per endpoint: nothing both served and merely tolerated."""
    for kind in ("chat", "completion"):
        assert not parameters.SERVED[kind] & set(parameters.OFF_VALUES[kind])


async def test_more_than_the_context_holds_is_400_before_dispatch(buyer: Buyer, nodes: Nodes,
                                                                  market: Market) -> None:
    """A prompt over the longest context, or an explicit max_tokens that cannot fit after
    it, is the buyer's error (400 context_length_exceeded, which SDKs do not retry), not
    a node's failure; a default max_tokens is cut to what fits instead."""
    from inference.fake import DeterministicEngine

    model = unique_model()
    await nodes.start(model, engine=DeterministicEngine(model_id=model, context_length=64))
    client = buyer.client()
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "word " * 200}], max_tokens=4)
    assert (_error(info.value)["code"], _error(info.value)["param"]) == (
        "context_length_exceeded", "messages")
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60)
    error = _error(info.value)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert "at most" in error["message"]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=model, messages=MESSAGES,
                                             max_completion_tokens=60)
    reply = await client.chat.completions.create(model=model, messages=MESSAGES)  # default
    assert reply.usage is not None
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 64
    async with httpx.AsyncClient(timeout=30) as http:  # nothing was held or charged
        account = (await http.get(f"{market.api}/account",
                                  headers={"Authorization": f"Bearer {buyer.key}"})).json()
    assert account["held"] == 0


@pytest.mark.parametrize("messages,param,code", [
    ([{"role": "function", "name": "f", "content": "42"}], "messages[0].role",
     "unsupported_parameter"),  # the legacy role; tool results are role "tool"
    ([{"role": "assistant", "content": None, "function_call": {"name": "f"}}],
     "messages[0].function_call", "unsupported_parameter"),
    ([{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                   {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
     "messages[0].content[1].type", "unsupported_content"),
    ([{"role": "user", "content": "hi", "audio": {"id": "a1"}}], "messages[0].audio",
     "unsupported_parameter"),
])
async def test_legacy_function_messages_and_images_are_400_naming_the_part(
        buyer: Buyer, market: Market, messages: list, param: str, code: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{market.api}/chat/completions", headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": "m", "messages": messages})
        batch = await client.post(
            f"{market.api}/batch", headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": "m", "conversations": [[{"role": "user", "content": "a"}], messages]})
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)
    assert batch.status_code == 400, batch.text
    assert batch.json()["error"]["param"] == f"conversations[1].{param}"


async def test_plain_message_fields_clients_send_are_accepted(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    reply = await buyer.client().chat.completions.create(model=model, max_tokens=3, messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"},
        {"role": "assistant", "content": "hello", "tool_calls": [], "refusal": None},
        {"role": "user", "content": "again"}])
    assert reply.choices[0].message.content
