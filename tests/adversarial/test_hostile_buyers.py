"""Hostile buyers against the real market: bad input is a clear 4xx and changes nothing;
no buyer overdraws or spends somebody else's approval.

Invariants held here: 1 (balance never below zero, concurrent overdraw), 4 (funding is
owned), 8 (requests bounded: size and credentials before parsing, no 500 on any input,
closed metric labels).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from solders.keypair import Keypair

from market.money import billing
from market.money.journal import audit
from protocol.keys import ALLOWANCE_DOMAIN, allowance_message, sign
from tests.support.market import Buyer, Market, Nodes, unique_model


def _journal_ok(market: Market) -> None:
    with market.state.db.session() as s:
        bad = [ln for ln in audit(s) if not ln.ok]
    assert not bad, bad


async def test_twenty_concurrent_requests_against_a_balance_for_three(
    nodes: Nodes, market: Market
) -> None:
    model = unique_model("overdraw")
    price = (1_000_000, 1_000_000)  # one base unit per token
    await nodes.start(model, price=price, max_concurrency=32, token_delay=0.05)
    messages = [{"role": "user", "content": "spend it all"}]
    max_tokens = 20
    from inference.convert import generation_request
    from inference.fake import FakeVocabulary

    prompt = len(FakeVocabulary().prompt_token_ids(generation_request(
        "chat", {"messages": messages, "max_tokens": max_tokens})))
    hold = billing.worst_case_hold(prompt, max_tokens, *price, market.settings.billing.market_fee_bps)
    buyer = market.buyer(credit=3 * hold + hold // 2)  # three holds, not four
    client = buyer.client(timeout=60)

    async def one() -> str:
        try:
            await client.chat.completions.create(model=model, messages=messages,
                                                 max_tokens=max_tokens)
            return "ok"
        except openai.APIStatusError as exc:
            return str(exc.status_code)

    results = await asyncio.gather(*(one() for _ in range(20)))
    assert results.count("ok") == 3, results
    assert set(results) == {"ok", "402"}
    account = buyer.get("/v1/account")
    assert account["held"] == 0 and 0 <= account["balance"] <= 3 * hold + hold // 2
    _journal_ok(market)


async def test_credentials_and_size_are_checked_before_the_body_is_parsed(
    market: Market, buyer: Buyer
) -> None:
    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        # not JSON at all, and no key: 401, not a parse error
        r = await http.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await http.post("/v1/chat/completions", content=b"{not json",
                            headers={"Authorization": "Bearer sk-aidp-wrong"})
        assert r.status_code == 401
        r = await http.post("/admin/accounts", content=b"{not json")
        assert r.status_code == 401
        # too big: 413 from Content-Length, and from a streamed body without one
        big = b"x" * (market.settings.limits.max_request_bytes + 1)
        r = await http.post("/v1/chat/completions", content=big,
                            headers={"Authorization": f"Bearer {buyer.key}"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunks():
            for _ in range(40):
                yield b"x" * 65536

        r = await http.post("/v1/chat/completions", content=chunks(),
                            headers={"Authorization": f"Bearer {buyer.key}"})
        assert r.status_code == 413


NASTY_BODIES = [
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**30},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_price_per_mtok": -1},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}],
     "max_price_per_mtok": 10**40},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e308},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": -0.0},
    {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "m", "messages": []},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "x" * 10_000},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3},
    {"model": "", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "m" * 10_000, "messages": [{"role": "user", "content": "hi"}]},
    {"model": ["m"], "messages": "hi"},
    {"prompt": "hi"},
    [],
    "just a string",
    None,
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/batch"])
async def test_no_input_makes_a_500(nodes: Nodes, market: Market, buyer: Buyer,
                                    path: str) -> None:
    model = unique_model("fuzz")
    await nodes.start(model)
    bodies: list[object] = list(NASTY_BODIES)
    for body in NASTY_BODIES:
        if isinstance(body, dict) and body.get("model") == "m":
            bodies.append({**body, "model": model})  # also against a served model
    raw = [b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
           ('{"model": "%s", "prompt": "\\udfff x"}' % model).encode(),
           b"\xff\xfe not utf-8", b'{"model": "m"' + b"[" * 10_000]
    async with httpx.AsyncClient(base_url=market.url, timeout=30,
                                 headers={"Authorization": f"Bearer {buyer.key}"}) as http:
        statuses = []
        for body in bodies:
            statuses.append((await http.post(path, json=body)).status_code)
        for content in raw:
            statuses.append((await http.post(
                path, content=content, headers={"Content-Type": "application/json"}
            )).status_code)
        for query in ("?page=99999999999999999999", "?page=-1", "?page=100000"):
            statuses.append((await http.get(f"/explorer/jobs{query}")).status_code)
        statuses.append((await http.get("/v1/usage?limit=999999999999")).status_code)
        statuses.append((await http.get("/v1/jobs/" + "x" * 5000)).status_code)
    assert all(400 <= s < 500 or s == 200 for s in statuses), statuses
    assert 500 not in statuses


async def test_metric_labels_come_from_a_closed_set(market: Market, buyer: Buyer) -> None:
    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        for i in range(50):
            await http.get(f"/v1/no-such-thing-{i}",
                           headers={"Authorization": f"Bearer {buyer.key}"})
            await http.get(f"/random/{i}/path")
            await http.get(f"/v1/jobs/job_{i}", headers={"Authorization": f"Bearer {buyer.key}"})
        text = (await http.get("/metrics")).text
    endpoints = {line.split('endpoint="')[1].split('"')[0]
                 for line in text.splitlines() if line.startswith("aidp_requests_total{")}
    from market.app import ROUTERS

    templates = {route.path for router in ROUTERS for route in router.routes}
    assert endpoints <= templates | {"unmatched", "/v1/*", "/admin/*"}, endpoints
    assert "/v1/jobs/{job_id}" in endpoints and "unmatched" in endpoints


async def test_an_allowance_needs_the_wallets_own_signature(market: Market) -> None:
    """A buyer cannot fund its account from somebody else's approval: only the wallet's
    own signature (this market, this account, now) registers it, once, for one account."""
    alice, mallory = market.buyer(credit=0, name="alice"), market.buyer(credit=0, name="m")
    wallet = Keypair()
    market_id = market.settings.market_id

    def body(signer: Keypair, account_id: str, signed_at: int | None = None) -> dict:
        at = int(time.time()) if signed_at is None else signed_at
        message = allowance_message(market_id, account_id, str(wallet.pubkey()), at)
        return {"wallet": str(wallet.pubkey()), "signed_at": at,
                "signature": sign(signer, ALLOWANCE_DOMAIN, message)}

    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        def post(who: Buyer, payload: dict):
            return http.post("/v1/chain/allowance", json=payload,
                             headers={"Authorization": f"Bearer {who.key}"})

        # Mallory names Alice's wallet, signing with her own key
        assert (await post(mallory, body(Keypair(), mallory.account_id))).status_code == 403
        # Alice's genuine registration, replayed by Mallory for Mallory's account
        genuine = body(wallet, alice.account_id)
        assert (await post(mallory, genuine)).status_code == 403
        assert (await post(alice, genuine)).status_code == 200
        assert (await post(alice, genuine)).status_code == 409  # replayed
        # even the wallet's own signature cannot fund a second account
        r = await post(mallory, body(wallet, mallory.account_id, int(time.time()) + 1))
        assert r.status_code == 409 and r.json()["error"]["code"] == "wallet_in_use"
    assert buyer_balance(market, mallory.account_id) == 0


def buyer_balance(market: Market, account_id: str) -> int:
    from market.models import Account

    with market.state.db.session() as s:
        return int(s.get(Account, account_id).balance)


async def test_a_buyer_cannot_see_or_challenge_another_buyers_job(
    nodes: Nodes, market: Market, buyer: Buyer
) -> None:
    model = unique_model("nosy")
    await nodes.start(model)
    reply = await buyer.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "mine"}], max_tokens=3)
    job_id = reply.id.removeprefix("chatcmpl-")
    other = market.buyer(name="other")
    async with httpx.AsyncClient(base_url=market.url, timeout=30,
                                 headers={"Authorization": f"Bearer {other.key}"}) as http:
        assert (await http.get(f"/v1/jobs/{job_id}")).status_code == 404
        assert (await http.post(f"/v1/jobs/{job_id}/challenge")).status_code == 404
