"""``n`` choices: one job per choice, each held, receipted and billed on its own; all
of them held or none; streamed, the choices come interleaved by ``index``."""

from __future__ import annotations

import openai
import pytest

from market.gateway.session import choice_seed
from market.money.billing import market_fee, node_cost, worst_case_hold
from tests.support.market import Market, Nodes, unique_model

MESSAGES = [{"role": "user", "content": "tell me a story"}]
PRICE = (3_000, 50_000)


def test_choice_seeds_keep_the_first_and_differ_after() -> None:
    assert choice_seed(None, 3) is None  # the market draws one per job
    assert choice_seed(42, 0) == 42
    seeds = {choice_seed(42, i) for i in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds if s != 42)
    assert choice_seed(42, 5) == choice_seed(42, 5) != choice_seed(43, 5)


async def test_n_choices_are_jobs_billed_each(market: Market, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model, price=PRICE)
    buyer = market.buyer(credit=10**9)
    reply = await buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=7, n=3, seed=9)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.content for c in reply.choices)
    usage = reply.usage
    assert usage is not None and usage.completion_tokens == 3 * 7
    report = buyer.get("/v1/usage")
    assert report["requests"] == 3 and report["completion_tokens"] == 21
    per_job = node_cost(usage.prompt_tokens // 3, 7, *PRICE)
    assert report["charged"] == 3 * (per_job + market_fee(per_job,
                                                           market.settings.billing.market_fee_bps))
    assert buyer.get("/v1/account")["held"] == 0


async def test_all_choices_are_held_or_none(market: Market, nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model, price=(1_000_000, 1_000_000))
    rich = market.buyer(credit=10**12)
    probe = await rich.client().chat.completions.create(model=model, messages=MESSAGES,
                                                        max_tokens=50)
    assert probe.usage is not None
    one = worst_case_hold(probe.usage.prompt_tokens, 50, 1_000_000, 1_000_000,
                          market.settings.billing.market_fee_bps)
    buyer = market.buyer(credit=one * 2)  # two choices' holds, not three
    with pytest.raises(openai.APIStatusError) as info:
        await buyer.client().chat.completions.create(model=model, messages=MESSAGES,
                                                     max_tokens=50, n=3)
    assert info.value.status_code == 402
    account = buyer.get("/v1/account")
    assert account["held"] == 0 and account["balance"] == one * 2, (account, buyer.get("/v1/usage"))
    assert buyer.get("/v1/usage")["charged"] == 0


async def test_streamed_choices_come_by_index_as_unstreamed_ones(market: Market,
                                                                  nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model, price=PRICE)
    buyer = market.buyer(credit=10**9)
    client = buyer.client()
    whole = await client.chat.completions.create(model=model, messages=MESSAGES,
                                                 max_tokens=6, n=3, seed=5)
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, n=3, seed=5, stream=True,
        stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert usage is not None and usage.completion_tokens == 18  # counted once, summed
    completions = await client.completions.create(model=model, prompt="Once", max_tokens=4,
                                                  n=2, stream=True)
    indices = {c.index async for chunk in completions for c in chunk.choices}
    assert indices == {0, 1}
    assert buyer.get("/v1/account")["held"] == 0


async def test_n_above_8_or_streamed_with_tools_is_400_naming_n(market: Market,
                                                               nodes: Nodes) -> None:
    model = unique_model()
    await nodes.start(model)
    buyer = market.buyer()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for extra, code in (({"n": 9}, "invalid_value"),
                        ({"n": 2, "stream": True, "tools": [tool]}, "unsupported_parameter"),
                        ({"n": 2, "stream": True, "logprobs": True}, "unsupported_parameter")):
        with pytest.raises(openai.BadRequestError) as info:
            await buyer.client().chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=4, extra_body=extra)
        error = info.value.response.json()["error"]
        assert (error["param"], error["code"]) == ("n", code)


async def test_a_buyer_leaving_streamed_choices_cancels_and_bills_each(market: Market,
                                                                       nodes: Nodes) -> None:
    from tests.support.market import wait_for

    model = unique_model()
    await nodes.start(model, price=PRICE, token_delay=0.05)
    buyer = market.buyer(credit=10**9)
    stream = await buyer.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=200, n=2, stream=True)
    seen = set()
    async for chunk in stream:
        seen.update(c.index for c in chunk.choices)
        if seen == {0, 1}:
            break
    await stream.close()  # the buyer goes away mid-stream
    await wait_for(lambda: buyer.get("/v1/account")["held"] == 0, timeout=20)
    jobs = [j for j in buyer.get("/v1/usage")["data"] if j["model"] == model]
    assert len(jobs) == 2 and {j["status"] for j in jobs} == {"cancelled"}
    assert all(0 < j["completion_tokens"] < 200 and j["charged"] > 0 for j in jobs)
