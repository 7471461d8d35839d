"""Receipts: fill ``protocol.receipt.ReceiptBody`` for one job and sign it."""

from __future__ import annotations

from solders.keypair import Keypair

from inference.base import Engine, GenerationRequest
from inference.embedding import SentenceEmbedder
from protocol import fingerprint as fp
from protocol.canonical import sha256_hex, token_ids_digest
from protocol.embedding import EMBEDDING_SAMPLING, EmbeddingRequest
from protocol.receipt import GpuMetrics, ReceiptBody, SignedReceipt, sign_receipt


def build_receipt(
    *,
    keypair: Keypair,
    job_id: str,
    market_id: str,
    engine: Engine,
    request: GenerationRequest,
    output_text: str,
    output_token_ids: list[int],
    fingerprint: bytes,
    prompt_tokens: int,
    started_at: float,
    finished_at: float,
    gpu: GpuMetrics | None = None,
) -> SignedReceipt:
    """Sign what this node did for ``job_id``.

    ``output_text`` must be exactly the concatenation of the chunk texts this node
    sent, and ``output_token_ids`` the ids it generated (not a continuation prefix it
    was given; that prefix is covered by ``request_sha256``), and ``fingerprint`` their
    rows (``protocol.fingerprint``), one per id.
    """
    body = ReceiptBody(
        job_id=job_id,
        market_id=market_id,
        node_pubkey=str(keypair.pubkey()),
        model_id=engine.model.id,
        model_sha256=engine.model.sha256,
        engine=engine.name,
        engine_version=engine.version,
        sampling=request.sampling,
        request_sha256=request.digest(),
        output_sha256=sha256_hex(output_text),
        output_token_ids_sha256=token_ids_digest(output_token_ids),
        prompt_tokens=prompt_tokens,
        completion_tokens=len(output_token_ids),
        started_at=started_at,
        finished_at=finished_at,
        gpu=gpu,
        fingerprint_sha256=fp.digest(fingerprint),
    )
    return sign_receipt(keypair, body, output_token_ids, fingerprint)


def build_embedding_receipt(
    *,
    keypair: Keypair,
    job_id: str,
    market_id: str,
    embedder: SentenceEmbedder,
    request: EmbeddingRequest,
    output: str,
    prompt_tokens: int,
    started_at: float,
    finished_at: float,
    gpu: GpuMetrics | None = None,
) -> SignedReceipt:
    """Sign the vectors this node computed for an embedding job: ``output`` is exactly
    the ``embedded`` frame's (``protocol.embedding``), whose hash the market checks and
    whose vectors a verifier recomputes; nothing is generated, so no ids, no
    fingerprint (the vectors themselves are what is re-checked)."""
    body = ReceiptBody(
        job_id=job_id,
        market_id=market_id,
        node_pubkey=str(keypair.pubkey()),
        model_id=embedder.model.id,
        model_sha256=embedder.model.sha256,
        engine=embedder.name,
        engine_version=embedder.version,
        sampling=EMBEDDING_SAMPLING,
        request_sha256=request.digest(),
        output_sha256=sha256_hex(output),
        output_token_ids_sha256=token_ids_digest([]),
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        started_at=started_at,
        finished_at=finished_at,
        gpu=gpu,
    )
    return sign_receipt(keypair, body, [])
