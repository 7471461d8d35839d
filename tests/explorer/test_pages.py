"""The explorer reads the real database: jobs appear, search finds them, proofs verify."""

from __future__ import annotations

import re

import httpx
import pytest
from sqlalchemy import select

from market.models import Anchor, Receipt
from protocol.merkle import ProofStep, merkle_root, verify_inclusion
from protocol.receipt import ReceiptBody
from tests.support.market import Buyer, Market, Nodes, unique_model


async def run_job(buyer: Buyer, model: str) -> str:
    reply = await buyer.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "explore me"}], max_tokens=8, temperature=0
    )
    return reply.id.split("-", 1)[1]


def receipts_of(market: Market, job_id: str) -> list[Receipt]:
    with market.state.db.session() as session:
        return list(session.scalars(select(Receipt).where(Receipt.job_id == job_id)))


def anchor_all(market: Market) -> Anchor:
    """Anchor every unanchored receipt in the DB (no chain: the page tests read the DB only)."""
    with market.state.db.session() as session:
        receipts = list(session.scalars(select(Receipt).where(Receipt.anchor_id.is_(None))))
        leaves = sorted(r.receipt_hash for r in receipts)
        anchor = Anchor(merkle_root=merkle_root(leaves), receipt_count=len(leaves),
                        tx_signature="SIG" + leaves[0][:20], slot=7)
        session.add(anchor)
        session.flush()
        for receipt in receipts:
            receipt.anchor_id = anchor.id
        return anchor


async def test_job_receipt_and_node_pages(market: Market, buyer: Buyer, nodes: Nodes) -> None:
    model = unique_model("explore")
    link = await nodes.start(model)
    job_id = await run_job(buyer, model)
    [receipt] = receipts_of(market, job_id)

    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        home = await http.get("/explorer")
        assert home.status_code == 200
        assert receipt.receipt_hash[:12] in home.text
        assert "<svg" in home.text  # charts render without JavaScript

        job_page = await http.get(f"/explorer/jobs/{job_id}")
        assert job_page.status_code == 200 and model in job_page.text

        page = await http.get(f"/explorer/receipts/{receipt.receipt_hash}")
        assert page.status_code == 200
        body = ReceiptBody.model_validate(receipt.receipt["body"])
        assert body.output_sha256 in page.text
        assert "pending" in page.text  # the challenge window state
        assert 'id="verify"' in page.text
        assert body.fingerprint_sha256 and body.fingerprint_sha256 in page.text

        # a verdict's fingerprint check is shown in the receipt's evidence
        with market.state.db.session() as session:
            stored = session.get(Receipt, receipt.id)
            stored.verification = {"outcome": "honest", "stats": {
                "fingerprint_checked": True, "fingerprint_mean_dev": 0.0421,
                "fingerprint_max_dev": 0.3125, "fingerprint_incomplete": 0.0}}
        page = await http.get(f"/explorer/receipts/{receipt.receipt_hash}")
        assert 'id="fingerprint-check"' in page.text and "mean deviation 0.0421" in page.text

        node_page = await http.get(f"/explorer/nodes/{link.pubkey}")
        assert node_page.status_code == 200 and receipt.receipt_hash[:12] in node_page.text

        assert (await http.get("/explorer/receipts/" + "0" * 64)).status_code == 404
        missing = await http.get(f"/explorer/api/receipts/{'0' * 64}/proof")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "receipt_not_found"
        assert (await http.get("/explorer/static/explorer.js")).status_code == 200
        assert (await http.get("/explorer/static/..%2Fqueries.py")).status_code == 404


@pytest.mark.parametrize("kind", ["job", "receipt", "node"])
async def test_search_finds_each_kind(market: Market, buyer: Buyer, nodes: Nodes, kind: str) -> None:
    model = unique_model("search")
    link = await nodes.start(model)
    job_id = await run_job(buyer, model)
    [receipt] = receipts_of(market, job_id)
    term = {"job": job_id, "receipt": receipt.receipt_hash, "node": link.pubkey}[kind]
    expected_path = {"job": f"/explorer/jobs/{job_id}",
                     "receipt": f"/explorer/receipts/{receipt.receipt_hash}",
                     "node": f"/explorer/nodes/{receipt.node_id}"}[kind]
    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        response = await http.get("/explorer/search", params={"q": term})
        assert response.status_code == 303
        assert response.headers["location"].endswith(expected_path)
        missing = await http.get("/explorer/search", params={"q": "no-such-thing"})
        assert missing.status_code == 404 and "Nothing found" in missing.text


async def test_proof_endpoint_proves_inclusion_and_tamper_changes_hash(
    market: Market, buyer: Buyer, nodes: Nodes
) -> None:
    model = unique_model("proof")
    await nodes.start(model)
    job_ids = [await run_job(buyer, model) for _ in range(3)]
    anchor = anchor_all(market)
    receipt = receipts_of(market, job_ids[1])[0]

    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        proof = (await http.get(f"/explorer/api/receipts/{receipt.receipt_hash}/proof")).json()
    assert proof["anchor"]["root"] == anchor.merkle_root
    steps = [ProofStep(s["sibling"], s["side"]) for s in proof["proof"]]
    from protocol.canonical import sha256_hex

    assert sha256_hex(proof["canonical"]) == receipt.receipt_hash
    assert verify_inclusion(receipt.receipt_hash, steps, anchor.merkle_root)

    # Tamper with the stored receipt: the served canonical bytes no longer hash to the leaf.
    with market.state.db.session() as session:
        stored = session.get(Receipt, receipt.id)
        assert stored is not None
        changed = dict(stored.receipt)
        changed["body"] = {**changed["body"], "completion_tokens": changed["body"]["completion_tokens"] + 1}
        stored.receipt = changed
    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        tampered = (await http.get(f"/explorer/api/receipts/{receipt.receipt_hash}/proof")).json()
    assert sha256_hex(tampered["canonical"]) != receipt.receipt_hash


async def test_lists_paginate(market: Market, buyer: Buyer, nodes: Nodes) -> None:
    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        for path in ["/explorer/jobs", "/explorer/nodes", "/explorer/anchors",
                     "/explorer/settlements", "/explorer/slashes"]:
            response = await http.get(path)
            assert response.status_code == 200, path
        jobs = await http.get("/explorer/jobs", params={"page": 1})
        job_links = re.findall(r"/explorer/jobs/(job_[0-9a-f]+)", jobs.text)
        assert len(job_links) <= 25
        assert (await http.get("/explorer/jobs", params={"page": 0})).status_code == 400
