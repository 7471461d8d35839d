"""The client libraries apps are built with, against a running market and real nodes
(llama.cpp serving SmolLM2, transformers serving all-MiniLM-L6-v2): ``langchain-openai``
(``with_structured_output`` returning a pydantic object, ``bind_tools`` producing a tool
call, streamed usage counted once, ``OpenAIEmbeddings``) and ``litellm`` (completion,
streaming, embeddings) as their users call them."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import BaseModel, Field

from inference.embedding import SentenceEmbedder
from tests.support.market import Buyer, Market, Nodes, serve_smol, unique_model

# litellm reads its model price map from the network unless told to use its own copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytestmark = pytest.mark.weights

ASK = "Describe a person named Ada who lives in Paris."


class Person(BaseModel):
    """A person, as the model describes them."""

    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    city: str = Field(max_length=24)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    model = SentenceEmbedder(threads=2)
    asyncio.run(model.start())
    return model


async def _embedding_node(market: Market, nodes: Nodes, embedder: SentenceEmbedder) -> str:
    from tests.verification.cheaters import CheapEmbedder

    model = unique_model("minilm")
    market.list_model(model, embedder.model.sha256, vocabulary=f"embedding:{embedder.directory}",
                      context_length=embedder.model.context_length)
    await nodes.start_embedder(CheapEmbedder(embedder, model_id=model))  # all the work: honest
    return model


@pytest.fixture
async def http() -> Any:
    """One HTTP client per test: LangChain otherwise shares one across event loops."""
    async with httpx.AsyncClient(timeout=60) as client:
        yield client


def _chat(market: Market, buyer: Buyer, model: str, http: httpx.AsyncClient,
          **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=market.api, api_key=buyer.key, max_retries=0,
                      http_async_client=http, **kwargs)


async def test_langchain_with_structured_output_returns_the_pydantic_object(
        buyer: Buyer, market: Market, nodes: Nodes, http: httpx.AsyncClient) -> None:
    model = await serve_smol(market, nodes)
    llm = _chat(market, buyer, model, http, temperature=0.7, max_tokens=80, seed=3)
    for method in ("json_schema", "function_calling"):
        person = await llm.with_structured_output(Person, method=method).ainvoke(ASK)
        assert isinstance(person, Person), (method, person)


async def test_langchain_bind_tools_gets_a_tool_call(buyer: Buyer, market: Market,
                                                     nodes: Nodes, http: httpx.AsyncClient) -> None:
    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city, in celsius or fahrenheit."""
        return f"sunny in {city}"

    model = await serve_smol(market, nodes)
    llm = _chat(market, buyer, model, http, temperature=0, max_tokens=80)
    # strict: the schema LangChain sends forbids other arguments, and the grammar holds it
    reply = await llm.bind_tools([get_weather], tool_choice="get_weather", strict=True).ainvoke(
        "What is the weather in Paris?")
    assert len(reply.tool_calls) == 1, reply
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    # the call goes back as history with its result, and the model answers in text
    from langchain_core.messages import HumanMessage, ToolMessage

    answer = await llm.ainvoke([HumanMessage("What is the weather in Paris?"), reply,
                                ToolMessage("sunny, 21 degrees", tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and answer.content


async def test_langchain_streamed_usage_is_counted_once(buyer: Buyer, market: Market,
                                                        nodes: Nodes, http: httpx.AsyncClient) -> None:
    model = await serve_smol(market, nodes)
    llm = _chat(market, buyer, model, http, temperature=0, max_tokens=12, stream_usage=True)
    total: Any = None
    async for chunk in llm.astream("Count from one to twenty."):
        total = chunk if total is None else total + chunk
    assert total is not None and total.content
    job = next(j for j in buyer.get("/v1/usage")["data"] if j["model"] == model)
    assert total.usage_metadata["output_tokens"] == job["completion_tokens"] == 12
    assert total.usage_metadata["input_tokens"] == job["prompt_tokens"]
    assert total.usage_metadata["total_tokens"] == job["prompt_tokens"] + 12


async def test_langchain_embeddings(buyer: Buyer, market: Market, nodes: Nodes,
                                    embedder: SentenceEmbedder, http: httpx.AsyncClient) -> None:
    from langchain_openai import OpenAIEmbeddings

    model = await _embedding_node(market, nodes, embedder)
    # the context check tokenizes with tiktoken (OpenAI's models); the market checks itself
    embeddings = OpenAIEmbeddings(model=model, base_url=market.api, api_key=buyer.key,
                                  check_embedding_ctx_length=False, max_retries=0,
                                  http_async_client=http)
    texts = ["a cat on a mat", "GPU inference settled on chain"]
    vectors = await embeddings.aembed_documents(texts)
    query = await embeddings.aembed_query(texts[0])
    own = np.frombuffer(embedder.embed_sync(embedder.tokenizer.encode(texts)),
                        dtype="<f4").reshape(2, -1)
    assert np.allclose(vectors, own, atol=1e-6) and np.allclose(query, own[0], atol=1e-6)


async def test_litellm_completion_streaming_and_embeddings(
        buyer: Buyer, market: Market, nodes: Nodes, embedder: SentenceEmbedder) -> None:
    import litellm

    litellm.telemetry = False
    model = await serve_smol(market, nodes)
    common = {"api_base": market.api, "api_key": buyer.key, "num_retries": 0}
    reply = await litellm.acompletion(
        model=f"openai/{model}", messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8, temperature=0, **common)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
    stream = await litellm.acompletion(
        model=f"openai/{model}", messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8, temperature=0, stream=True, **common)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == reply.choices[0].message.content  # greedy: the same text
    structured = await litellm.acompletion(
        model=f"openai/{model}", messages=[{"role": "user", "content": ASK}],
        response_format=Person, max_tokens=80, temperature=0.7, seed=5, **common)
    assert Person.model_validate_json(structured.choices[0].message.content)

    embedding_model = await _embedding_node(market, nodes, embedder)
    vectors = await litellm.aembedding(model=f"openai/{embedding_model}",
                                       input=["a cat", "a dog"], **common)
    assert [len(d["embedding"]) for d in vectors.data] == [384, 384]
    assert vectors.usage.prompt_tokens == sum(embedder.tokenizer.count(["a cat", "a dog"]))
