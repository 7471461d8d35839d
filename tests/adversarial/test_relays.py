"""A relaying market and its tricks: the node's signature binds the market it meant, and
non-local markets are reached over wss:// with a certificate the node checks.

Invariants held here: 7 (auth binds what it says).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import openai
import pytest
import uvicorn
from solders.keypair import Keypair
from websockets.asyncio.client import connect

from market.app import create_app
from market.settings import MarketSettings, nested
from node_agent.link import NodeLink
from protocol.keys import LINK_AUTH_DOMAIN, link_auth_message, sign
from protocol.messages import Hello, ModelOffer, Price, encode
from tests.support.engines import DeterministicEngine
from tests.support.market import ADMIN_TOKEN, Market, stop_link, unique_model
from tests.support.net import free_port


async def test_a_relayed_challenge_signed_for_another_market_is_refused(market: Market) -> None:
    """Evil market E relays the real market's challenge to a node that dialed E. The node
    signs E's name; E forwards the signature with ``Host: E`` on its own connection. The
    real market checks against its own configured identity, not the Host it was sent."""
    model = unique_model("relay")
    market.list_model(model, DeterministicEngine(model).model.sha256)
    victim = Keypair()
    evil_host = "evil-market.example:8000"
    # E's own connection to the real market, asking for E's name in its Host header
    sock = socket.create_connection(("127.0.0.1", int(market.url.rsplit(":", 1)[1])))
    async with connect(f"ws://{evil_host}/v1/node/link", sock=sock) as ws:
        await ws.send(encode(Hello(
            pubkey=str(victim.pubkey()), agent_version="relayed",
            models=[ModelOffer(id=model, sha256=DeterministicEngine(model).model.sha256,
                               engine="x", context_length=4096)],
            price=Price(input=1, output=1), max_concurrency=1)))
        challenge = json.loads(await ws.recv())
        # what the victim signs: the market it dialed (evil), and the relayed nonce
        signature = sign(victim, LINK_AUTH_DOMAIN,
                         link_auth_message(evil_host, bytes.fromhex(challenge["nonce"])))
        await ws.send(json.dumps({"type": "auth", "signature": signature}))
        reply = json.loads(await ws.recv())
    assert reply["type"] == "reject" and "does not verify" in reply["reason"]
    assert str(victim.pubkey()) not in {c.pubkey for c in market.state.registry.links.values()}


@pytest.fixture
def tls_market(tmp_path: Path, db_url: str):
    """The market served over TLS with a self-signed (test CA) certificate."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = (tmp_path / "cert.pem", tmp_path / "key.pem",
                                    tmp_path / "ca.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    from tests.support.market import HEARTBEAT

    settings = MarketSettings(**nested(dict(db__url=db_url, data_dir=tmp_path, admin_token=ADMIN_TOKEN,
                              public_url=f"https://127.0.0.1:{port}", host="127.0.0.1",
                              port=port, routing__heartbeat_interval=HEARTBEAT, limits__rate_limit_rpm=100_000,
                              tls_certfile=cert_file, tls_keyfile=key_file)))
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=str(cert_file),
                                           ssl_keyfile=str(key_file), lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield settings, app, ca_file
    finally:
        server.should_exit = True
        thread.join(10)


async def test_nodes_and_buyers_reach_a_market_over_tls_checking_its_certificate(
    tls_market,
) -> None:
    import httpx

    settings, app, ca_file = tls_market
    base = settings.market_url
    model = unique_model("tls")
    trust = ssl.create_default_context(cafile=str(ca_file))
    async with httpx.AsyncClient(base_url=base, verify=trust, timeout=30,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        (await admin.put(f"/admin/models/{model}", json={
            "sha256": [DeterministicEngine(model).model.sha256], "vocabulary": "fake"})
         ).raise_for_status()
        account = (await admin.post("/admin/accounts", json={"name": "tls"})).json()
        await admin.post(f"/admin/accounts/{account['id']}/credit", json={"amount": 10**9})
        key = (await admin.post(f"/admin/accounts/{account['id']}/keys", json={})).json()["key"]

    untrusting = NodeLink(base, Keypair(), DeterministicEngine(model), backoff_initial=0.2)
    run = asyncio.create_task(untrusting.run())
    try:
        deadline = time.monotonic() + 10
        while untrusting.stats.last_error is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert "CERTIFICATE_VERIFY_FAILED" in untrusting.stats.last_error
        assert not untrusting.ready.is_set()
    finally:
        await stop_link(untrusting, run)

    link = NodeLink(base, Keypair(), DeterministicEngine(model), ssl_context=trust,
                    backoff_initial=0.2)
    assert link.url.startswith("wss://")
    run = asyncio.create_task(link.run())
    try:
        await link.wait_ready(15)
        deadline = time.monotonic() + 10
        while link.node_id not in app.state.market.registry.links:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0,
                                    http_client=httpx.AsyncClient(verify=trust))
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "over tls"}], max_tokens=4)
        assert reply.usage.completion_tokens > 0
        await client.close()
    finally:
        await stop_link(link, run)
