"""End to end: ``make up``'s network answers the openai SDK with real SmolLM2 on llama.cpp,
and every answer leaves a signed receipt whose hashes match what the market relayed."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select

from market.db import make_sync_engine
from market.models import Receipt
from protocol.canonical import sha256_hex
from protocol.receipt import SignedReceipt
from tests.e2e.conftest import Network

MODEL = "SmolLM2-135M-Instruct"
pytestmark = pytest.mark.slow


def receipts_for(network: Network, job_id: str) -> list[Receipt]:
    engine = make_sync_engine(network.database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(Receipt).where(Receipt.job_id == job_id)).all())
    finally:
        engine.dispose()


def assert_receipt_matches(network: Network, response_id: str, text: str) -> dict[str, Any]:
    job_id = response_id.split("-", 1)[1]
    [row] = receipts_for(network, job_id)
    signed = SignedReceipt.model_validate(row.receipt)
    assert signed.signature_valid()
    assert signed.token_ids_consistent()
    assert signed.body.output_sha256 == sha256_hex(text) == sha256_hex(row.output_text)
    assert signed.body.model_id == MODEL and signed.body.engine == "llamacpp"
    return signed.body.model_dump()


def client(network: Network) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{network.market_url}/v1", api_key=network.api_key, max_retries=0,
                         timeout=120)


def test_models_lists_smollm2(network: Network) -> None:
    assert MODEL in [m.id for m in client(network).models.list().data]


def test_chat_non_stream_leaves_a_verified_receipt(network: Network) -> None:
    reply = client(network).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0,
    )
    text = reply.choices[0].message.content or ""
    assert text.strip()
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24
    body = assert_receipt_matches(network, reply.id, text)
    assert body["completion_tokens"] == reply.usage.completion_tokens


def test_chat_stream_matches_non_stream_under_greedy(network: Network) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    sdk = client(network)
    whole = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    stream = sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, stream_id = [], None, None
    for chunk in stream:
        stream_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    streamed = "".join(pieces)
    assert streamed == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert stream_id is not None
    assert_receipt_matches(network, stream_id, streamed)


def test_completions_endpoint(network: Network) -> None:
    reply = client(network).completions.create(model=MODEL, prompt="The sky is", max_tokens=8,
                                               temperature=0)
    assert reply.choices[0].text
    assert_receipt_matches(network, reply.id, reply.choices[0].text)


def test_bad_key_is_an_openai_401(network: Network) -> None:
    bad = openai.OpenAI(base_url=f"{network.market_url}/v1", api_key="sk-aidp-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.status_code == 401


def test_metrics_are_exposed(network: Network) -> None:
    client(network).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    market = httpx.get(f"{network.market_url}/metrics", timeout=10).text
    node = httpx.get(network.node_metrics_url, timeout=10).text
    assert [line for line in market.splitlines() if line.startswith("aidp_") and "ttft" in line]
    assert [line for line in node.splitlines() if line.startswith("aidp_node_")]


def test_the_network_guards_itself_by_default(network: Network) -> None:
    """``make up`` leaves nothing at a guessable default: its own admin token (private
    file), a random sampling key in the database, and a node that had to bond real stake
    on the local chain to be welcomed."""
    import stat

    from sqlalchemy import text

    from market.devnet import DEVNET_MIN_STAKE
    from market.settings import DEFAULT_ADMIN_TOKEN

    token_file = network.data_dir / "admin-token"
    token = token_file.read_text().strip()
    assert token != DEFAULT_ADMIN_TOKEN and len(token) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    admin = httpx.get(f"{network.market_url}/admin/nodes",
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert admin.status_code == 200
    assert httpx.get(f"{network.market_url}/admin/nodes", timeout=10,
                     headers={"Authorization": f"Bearer {DEFAULT_ADMIN_TOKEN}"}
                     ).status_code == 401
    engine = make_sync_engine(network.database_url)
    try:
        with engine.connect() as conn:
            key = conn.execute(text(
                "SELECT value FROM market_secrets WHERE name = 'verify_sampling_key'")).scalar()
    finally:
        engine.dispose()
    assert key and len(bytes.fromhex(key)) == 32
    import time

    deadline = time.monotonic() + 60
    while True:  # nodes.stake mirrors the chain after the next settle step
        nodes = httpx.get(f"{network.market_url}/admin/nodes", timeout=10,
                          headers={"Authorization": f"Bearer {token}"}).json()["data"]
        if nodes and nodes[0]["stake"] >= DEVNET_MIN_STAKE:
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(1)
