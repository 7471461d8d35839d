"""The buyer's API through the real ``openai`` SDK against a running market and real
node links (DeterministicEngine behind node_agent.link.NodeLink)."""

from __future__ import annotations

import httpx
import openai
import pytest

from market.money.billing import market_fee, node_cost
from tests.support.market import Buyer, Market, Nodes, expected_output, unique_model

# The deterministic engine produces 119 tokens before EOS for this conversation.
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "tell me a story"},
]


async def test_models_lists_what_nodes_offer(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model, price=(7, 9))
    listing = await buyer.client().models.list()
    ids = [m.id for m in listing.data]
    assert model in ids
    entry = next(m for m in listing.data if m.id == model)
    assert entry.model_extra["price_per_mtok"] == {"input": 7, "output": 9}


async def test_chat_non_stream(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    reply = await buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0
    )
    text, ids = await expected_output("chat", model, 12, messages=MESSAGES)
    assert len(ids) == 12
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == len(ids)
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.id.startswith("chatcmpl-job_")


async def test_chat_stream_with_usage(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    stream = await buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage, roles = [], None, None, []
    async for chunk in stream:
        if chunk.usage is not None and not chunk.choices:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                parts.append(choice.delta.content)
            finish = choice.finish_reason or finish
    text, ids = await expected_output("chat", model, 20, messages=MESSAGES)
    assert len(ids) == 20
    assert "".join(parts) == text
    assert roles[:1] == ["assistant"]
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens == len(ids)


async def test_stream_is_sse_with_done(buyer: Buyer, nodes: Nodes, market: Market) -> None:
    model = unique_model()
    await nodes.start(model)
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{market.api}/chat/completions",
            headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": model, "messages": MESSAGES, "max_tokens": 5, "stream": True},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line.strip()]
    assert events[-1] == "data: [DONE]"
    # without include_usage no chunk carries usage (test_openai_strict: counted once)
    assert '"usage"' not in events[-2] and '"finish_reason":"length"' in events[-2]


async def test_completions_stream_and_not(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    client = buyer.client()
    prompt = "Once upon a time"
    text, ids = await expected_output("completion", model, 16, prompt=prompt)
    assert len(ids) == 16
    reply = await client.completions.create(model=model, prompt=prompt, max_tokens=16)
    assert reply.choices[0].text == text
    assert reply.usage is not None and reply.usage.completion_tokens == len(ids)

    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        parts.extend(c.text for c in chunk.choices)
    assert "".join(parts) == text
    assert usage is not None and usage.completion_tokens == len(ids)


async def test_completions_echo_prepends_the_prompt(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    client = buyer.client()
    prompt = "Once upon a time"
    text, _ = await expected_output("completion", model, 8, prompt=prompt)
    reply = await client.completions.create(model=model, prompt=prompt, max_tokens=8, echo=True)
    assert reply.choices[0].text == prompt + text
    assert reply.usage is not None and reply.usage.completion_tokens == 8  # billed as before
    stream = await client.completions.create(model=model, prompt=[prompt], max_tokens=8,
                                             echo=True, stream=True)
    parts = [c.text async for chunk in stream for c in chunk.choices]
    assert parts[0].startswith(prompt) and "".join(parts) == prompt + text
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=model, prompt=prompt, max_tokens=8, echo=True,
                                        logprobs=2)
    assert info.value.response.json()["error"]["param"] == "echo"


async def test_batch_returns_results_in_order(buyer: Buyer, nodes: Nodes, market: Market) -> None:
    model = unique_model()
    await nodes.start(model, max_concurrency=4)
    prompts = [f"prompt number {i}" for i in range(6)]
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{market.api}/batch",
            headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": model, "prompts": prompts, "max_tokens": 8},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["index"] for r in body["data"]] == list(range(6))
    total = 0
    for prompt, result in zip(prompts, body["data"], strict=True):
        text, ids = await expected_output("completion", model, 8, prompt=prompt)
        assert result["response"]["choices"][0]["text"] == text
        total += len(ids)
    assert total > 0
    assert body["usage"]["completion_tokens"] == total


async def test_batch_of_conversations(buyer: Buyer, nodes: Nodes, market: Market) -> None:
    model = unique_model()
    await nodes.start(model)
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{market.api}/batch",
            headers={"Authorization": f"Bearer {buyer.key}"},
            json={"model": model, "conversations": conversations, "max_tokens": 6},
        )
    body = response.json()
    for conv, result in zip(conversations, body["data"], strict=True):
        text, _ = await expected_output("chat", model, 6, messages=conv)
        assert result["response"]["choices"][0]["message"]["content"] == text


# ---- errors --------------------------------------------------------------------------------


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_bad_key_is_401(market: Market, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    client = Buyer(account_id="-", key="sk-aidp-not-a-real-key", market=market).client()
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model=model, messages=MESSAGES)
    assert info.value.status_code == 401
    assert _error(info.value)["code"] == "invalid_api_key"


async def test_revoked_key_is_401(market: Market, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    buyer = market.buyer()
    await buyer.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    with market.admin() as admin:
        keys = admin.get(f"/admin/accounts/{buyer.account_id}/keys").json()["data"]
        admin.delete(f"/admin/keys/{keys[0]['id']}").raise_for_status()
    with pytest.raises(openai.AuthenticationError):
        await buyer.client().chat.completions.create(model=model, messages=MESSAGES)


async def test_insufficient_balance_is_402(market: Market, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model, price=(1_000_000, 1_000_000))
    poor = market.buyer(credit=10)
    with pytest.raises(openai.APIStatusError) as info:
        await poor.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=50)
    assert info.value.status_code == 402
    assert _error(info.value)["code"] == "insufficient_balance"
    account = poor.get("/v1/account")
    assert account["held"] == 0 and account["balance"] == 10


async def test_hold_refused_after_a_cached_yes_stops_the_job_uncharged(
    market: Market, nodes: Nodes
) -> None:
    """A second request is dispatched on the in-memory balance; when the database then
    refuses its hold (the balance fell elsewhere), the buyer gets 402 and pays nothing."""
    from sqlalchemy import func, select, update

    from market.models import Account, Job

    model = unique_model()
    link = await nodes.start(model, price=(1_000, 1_000))
    buyer = market.buyer(credit=1_000_000)
    await buyer.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=5)
    assert market.state.funds.try_reserve(buyer.account_id, 0)  # the balance is cached
    accepted = link.stats.jobs_accepted
    with market.state.db.session() as session:
        session.execute(update(Account).where(Account.id == buyer.account_id).values(balance=0))
        jobs_before = session.scalar(select(func.count()).select_from(Job))
    with pytest.raises(openai.APIStatusError) as info:
        await buyer.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=5)
    assert info.value.status_code == 402
    assert _error(info.value)["code"] == "insufficient_balance"
    assert link.stats.jobs_accepted == accepted + 1  # dispatched before the hold was written
    account = buyer.get("/v1/account")
    assert account["balance"] == 0 and account["held"] == 0
    with market.state.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == jobs_before
    # The refusal dropped the cached balance: the next request asks the database first.
    assert not market.state.funds.try_reserve(buyer.account_id, 1)


async def test_unknown_model_is_404(buyer: Buyer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await buyer.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert _error(info.value)["code"] == "model_not_found"


@pytest.mark.parametrize(
    "extra",
    [{"temperature": 7}, {"n": 9}, {"max_tokens": 0}, {"messages": []}, {"top_p": 0}],
)
async def test_bad_body_is_4xx(buyer: Buyer, nodes: Nodes, extra: dict) -> None:
    model = unique_model()
    await nodes.start(model)
    body = {"model": model, "messages": MESSAGES, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        await buyer.client().chat.completions.create(**body)
    assert info.value.status_code == 400
    assert _error(info.value)["type"] == "invalid_request_error"


async def test_invalid_json_is_400(buyer: Buyer, market: Market) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{market.api}/chat/completions",
            headers={"Authorization": f"Bearer {buyer.key}", "Content-Type": "application/json"},
            content=b"{not json",
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_no_healthy_node_is_503(buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model()
    link = await nodes.start(model)
    await link.stop()
    from tests.support.market import wait_for

    await wait_for(lambda: link.node_id not in buyer.market.state.registry.links)
    with pytest.raises(openai.InternalServerError) as info:
        await buyer.client().chat.completions.create(model=model, messages=MESSAGES)
    assert info.value.status_code == 503
    assert _error(info.value)["code"] == "no_healthy_node"


async def test_rate_limit_is_429_with_retry_after(db_url: str) -> None:
    from tests.support.market import start_market

    small = start_market(db_url, limits__rate_limit_rpm=2)
    try:
        buyer = small.buyer()
        client = buyer.client()
        await client.models.list()
        await client.models.list()
        with pytest.raises(openai.RateLimitError) as info:
            await client.models.list()
        assert info.value.status_code == 429
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert _error(info.value)["code"] == "rate_limit_exceeded"
    finally:
        small.stop()


# ---- money and usage ---------------------------------------------------------------------


async def test_charge_is_node_cost_plus_fee_and_hold_released(market: Market, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model, price=(3_000, 50_000))
    buyer = market.buyer(credit=1_000_000)
    reply = await buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=30
    )
    usage = reply.usage
    assert usage is not None
    cost = node_cost(usage.prompt_tokens, usage.completion_tokens, 3_000, 50_000)
    fee = market_fee(cost, market.settings.billing.market_fee_bps)
    account = buyer.get("/v1/account")
    assert account["held"] == 0
    assert account["balance"] == 1_000_000 - cost - fee
    report = buyer.get("/v1/usage")
    assert report["requests"] == 1
    assert report["completion_tokens"] == usage.completion_tokens
    assert report["charged"] == cost + fee
    assert report["fees"] == fee
    assert report["data"][0]["status"] == "completed"


async def test_price_cap_filters_nodes(buyer: Buyer, nodes: Nodes, market: Market) -> None:
    model = unique_model()
    cheap = await nodes.start(model, price=(10, 10))
    await nodes.start(model, price=(10_000, 10_000))
    for _ in range(6):
        await buyer.client().chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=3, extra_body={"max_price_per_mtok": 100}
        )
    assert cheap.stats.jobs_accepted == 6
    with pytest.raises(openai.InternalServerError) as info:
        await buyer.client().chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=3, extra_body={"max_price_per_mtok": 1}
        )
    assert _error(info.value)["code"] == "no_node_within_price_cap"


async def test_metrics_exposed(buyer: Buyer, nodes: Nodes, market: Market) -> None:
    model = unique_model()
    await nodes.start(model)
    await buyer.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        await buyer.client().chat.completions.create(model="nope", messages=MESSAGES)
    text = httpx.get(f"{market.url}/metrics").text
    assert 'aidp_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'aidp_requests_total{endpoint="/v1/chat/completions",status="404"}' in text
    assert f'aidp_ttft_seconds_count{{model="{model}"}} 1.0' in text
    assert 'aidp_request_seconds_bucket{endpoint="/v1/chat/completions",le="0.001"}' in text
    assert f'aidp_tokens_total{{model="{model}",type="completion"}}' in text
    assert 'aidp_nodes{state="healthy"}' in text
    assert 'aidp_failovers_total{phase="mid_stream"}' in text


async def test_every_job_carries_a_sampling_seed(market: Market, buyer: Buyer, nodes: Nodes) -> None:
    """The protocol sampler draws its noise from the job's seed, so the market fixes one
    when the buyer did not (and keeps the buyer's): the verifier re-derives the same."""
    from market.models import Job
    from protocol.job import JobRequest

    model = unique_model()
    await nodes.start(model)
    client = buyer.client()
    mine = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4,
                                                temperature=1.0, seed=-12345)
    drawn = [await client.chat.completions.create(model=model, messages=MESSAGES,
                                                  max_tokens=4, temperature=1.0)
             for _ in range(2)]
    with market.state.db.session() as session:
        def seed(reply) -> int | None:
            job = session.get(Job, reply.id.removeprefix("chatcmpl-"))
            return JobRequest.model_validate(job.request).sampling.seed

        assert seed(mine) == -12345
        seeds = [seed(r) for r in drawn]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]
