"""The explorer reads the real database: jobs appear, search finds them, proofs verify."""

from __future__ import annotations

import re
import secrets

import httpx
import pytest
from solders.keypair import Keypair
from sqlalchemy import select

from chain import aidp
from market.models import Anchor, ChainTransfer, Receipt
from market.onchain.models import ChainPayoutEpoch, ChainPayoutLeaf, ChainVerdict
from market.onchain.runtime import config_path
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


def sig() -> str:
    """A transaction signature as the pages show it (base58, 64 bytes)."""
    return str(Keypair().sign_message(secrets.token_bytes(8)))


def post_epoch(market: Market, amounts: list[int]) -> tuple[aidp.PayoutEpoch, str, str]:
    """An epoch as settlement leaves it once posted (``payout`` row, epoch, leaves), with
    leaf 0 claimed by the market, leaf 1 by the node itself (confirmed, no signature of
    ours) and the rest still planned; returns the epoch and the post's and the claim's
    signatures."""
    planned = aidp.plan_epoch(0, [(str(Keypair().pubkey()), a) for a in amounts])
    post_sig, claim_sig = sig(), sig()
    with market.state.db.session() as session:
        post = ChainTransfer(kind="payout", idempotency_key=f"payout:t{secrets.token_hex(4)}",
                             amount=planned.total, from_address=str(Keypair().pubkey()),
                             to_address=str(Keypair().pubkey()), state="confirmed",
                             signature=post_sig)
        session.add(post)
        session.flush()
        epoch = aidp.PayoutEpoch(post.id, planned.leaves)
        session.add(ChainPayoutEpoch(epoch=epoch.epoch, root=epoch.root, total=epoch.total,
                                     leaf_count=len(epoch.leaves)))
        session.flush()
        for leaf in epoch.leaves:
            session.add(ChainPayoutLeaf(epoch=epoch.epoch, leaf_index=leaf.index,
                                        node=leaf.node, amount=leaf.amount))
            session.add(ChainTransfer(
                kind="claim", idempotency_key=f"claim:{epoch.epoch}:{leaf.index}",
                amount=leaf.amount, to_address=str(Keypair().pubkey()),
                state="confirmed" if leaf.index < 2 else "planned",
                signature=claim_sig if leaf.index == 0 else None))
    return epoch, post_sig, claim_sig


def page_proof(html: str, leaf_hex: str) -> list[ProofStep]:
    """The proof the epoch page prints for one leaf, read back from its markup."""
    block = re.search(rf'<ol class="proof" data-leaf="{leaf_hex}">(.*?)</ol>', html, re.DOTALL)
    assert block, leaf_hex
    return [ProofStep(sibling, side) for side, sibling in
            re.findall(r'data-side="(left|right)" data-sibling="([0-9a-f]{64})"', block[1])]


def slash_receipt(market: Market, receipt: Receipt, verifiers: list[str],
                  case_sig: str | None, slash: tuple[int, str | None] | None) -> None:
    """What the verification worker and the settlement loop leave for a slashed receipt:
    the verifiers' verdict signatures, the case row and the slash row."""
    with market.state.db.session() as session:
        session.get(Receipt, receipt.id).state = "slashed"
        for verifier in verifiers:
            session.add(ChainVerdict(receipt_id=receipt.id, verifier=verifier, amount=5_000_000,
                                     refund=0, refund_account=str(Keypair().pubkey()), nonce=1,
                                     signature=sig()))
        if case_sig:
            session.add(ChainTransfer(kind="case", idempotency_key=f"case:{receipt.id}",
                                      to_address=str(Keypair().pubkey()), state="confirmed",
                                      signature=case_sig))
        if slash:
            amount, signature = slash
            session.add(ChainTransfer(kind="slash", idempotency_key=f"slash:{receipt.id}",
                                      amount=amount, from_address=str(Keypair().pubkey()),
                                      to_address=str(Keypair().pubkey()), state="confirmed",
                                      signature=signature))


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


async def test_settlements_list_epochs_and_an_epoch_proves_each_leaf(market: Market) -> None:
    epoch, post_sig, claim_sig = post_epoch(market, [1_500_000, 250_000, 42])
    leaves = epoch.leaves
    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        listing = await http.get("/explorer/settlements")
        assert listing.status_code == 200
        assert f"/explorer/epochs/{epoch.epoch}" in listing.text
        assert epoch.root[:16] in listing.text and post_sig[:16] in listing.text
        assert "1.750042 AIDP" in listing.text and "2 / 3" in listing.text

        page = await http.get(f"/explorer/epochs/{epoch.epoch}")
        assert page.status_code == 200
        assert epoch.root in page.text and post_sig[:24] in page.text
        assert "2 / 3" in page.text
        for leaf in leaves:
            assert leaf.node in page.text and leaf.leaf_hex() in page.text
            assert verify_inclusion(leaf.leaf_hex(), page_proof(page.text, leaf.leaf_hex()),
                                    epoch.root)
        assert claim_sig[:16] in page.text
        assert page.text.count("claimed by the node") == 1
        assert "0.000042 AIDP" in page.text and "planned" in page.text

        data = (await http.get(f"/explorer/api/epochs/{epoch.epoch}")).json()
        assert data["root"] == data["rebuilt_root"] == epoch.root
        assert data["claimed"] == 2 and data["leaf_count"] == 3
        assert data["post"] == {"state": "confirmed", "signature": post_sig}
        for served, leaf in zip(data["leaves"], leaves, strict=True):
            assert served["leaf"] == leaf.leaf_hex() and served["node"] == leaf.node
            steps = [ProofStep(p["sibling"], p["side"]) for p in served["proof"]]
            assert verify_inclusion(leaf.leaf_hex(), steps, epoch.root)
        assert data["leaves"][1]["claim"] == {"state": "confirmed", "signature": None}
        # a proof for another leaf's bytes fails: the page proves leaves, not just paths
        steps = [ProofStep(p["sibling"], p["side"]) for p in data["leaves"][0]["proof"]]
        assert not verify_inclusion(leaves[1].leaf_hex(), steps, epoch.root)

        assert data["closed"] is None and "every leaf was paid" not in page.text

        # every leaf paid and the epoch closed on chain: the page says so, proofs stay
        close_sig = sig()
        with market.state.db.session() as session:
            session.add(ChainTransfer(kind="close", idempotency_key=f"close:{epoch.epoch}",
                                      amount=0, state="confirmed", signature=close_sig))
        page = await http.get(f"/explorer/epochs/{epoch.epoch}")
        assert "every leaf was paid" in page.text and close_sig[:24] in page.text
        data = (await http.get(f"/explorer/api/epochs/{epoch.epoch}")).json()
        assert data["closed"] == {"state": "confirmed", "signature": close_sig}
        assert len(data["leaves"]) == 3

        found = await http.get("/explorer/search", params={"q": post_sig})
        assert found.status_code == 303
        assert found.headers["location"].endswith(f"/explorer/epochs/{epoch.epoch}")
        found = await http.get("/explorer/search", params={"q": claim_sig})
        assert found.headers["location"].endswith(f"/explorer/epochs/{epoch.epoch}")

        for unknown in ["999999", "abc", "²", str(2**80)]:
            assert (await http.get(f"/explorer/epochs/{unknown}")).status_code == 404
            missing = await http.get(f"/explorer/api/epochs/{unknown}")
            assert missing.status_code == 404, unknown
            assert missing.json()["error"]["code"] == "epoch_not_found"
            assert missing.json()["error"]["param"] == "epoch"


async def test_slashes_show_case_slash_and_verdict_signers(
    market: Market, buyer: Buyer, nodes: Nodes
) -> None:
    model = unique_model("slash")
    await nodes.start(model)
    [caught] = receipts_of(market, await run_job(buyer, model))
    [unstaked] = receipts_of(market, await run_job(buyer, model))
    verifiers = [str(Keypair().pubkey()) for _ in range(2)]
    case_sig, slash_sig = sig(), sig()
    slash_receipt(market, caught, verifiers, case_sig, (5_000_000, slash_sig))
    # a node with nothing staked on chain: the slash is recorded, never sent, no case
    slash_receipt(market, unstaked, verifiers[:1], None, (0, None))

    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        page = await http.get("/explorer/slashes")
        assert page.status_code == 200
        assert caught.receipt_hash[:12] in page.text and unstaked.receipt_hash[:12] in page.text
        assert case_sig[:16] in page.text and slash_sig[:16] in page.text
        assert "5.000000 AIDP" in page.text
        assert all(f'title="{v}"' in page.text for v in verifiers)
        assert "nothing to take: not sent" in page.text

        receipt = await http.get(f"/explorer/receipts/{caught.receipt_hash}")
        assert 'id="slash"' in receipt.text
        assert case_sig[:24] in receipt.text and slash_sig[:24] in receipt.text
        assert "2 verifiers (quorum 2)" in receipt.text
        assert all(v in receipt.text for v in verifiers)

        receipt = await http.get(f"/explorer/receipts/{unstaked.receipt_hash}")
        assert "case</dt><dd>none needed" in receipt.text
        assert "nothing staked on chain to take" in receipt.text
        assert "1 verifier (quorum 2)" in receipt.text

        found = await http.get("/explorer/search", params={"q": case_sig})
        assert found.headers["location"].endswith("/explorer/slashes")


async def test_node_page_names_its_stake_vault_once_the_program_is_known(
    market: Market, buyer: Buyer, nodes: Nodes
) -> None:
    model = unique_model("vault")
    link = await nodes.start(model)
    await run_job(buyer, model)
    async with httpx.AsyncClient(base_url=market.url, timeout=30) as http:
        assert 'id="stake-vault"' not in (await http.get(f"/explorer/nodes/{link.pubkey}")).text
        program_id = Keypair().pubkey()
        path = config_path(market.settings)
        any_key = str(Keypair().pubkey())
        aidp.ChainConfig(mint=any_key, decimals=6, market=any_key, deposit=any_key,
                         treasury=any_key, program=str(program_id)).save(path)
        try:
            page = await http.get(f"/explorer/nodes/{link.pubkey}")
        finally:
            path.unlink()
    vault = aidp.program.vault_address(program_id, link.keypair.pubkey())
    assert f'<code id="stake-vault">{vault}</code>' in page.text
