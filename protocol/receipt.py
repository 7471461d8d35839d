"""The receipt a node posts for every job, and how it is hashed and signed.

The receipt hash (sha256 of the canonical body) is the Merkle leaf anchored on
chain; the node signs that same hash, so checking a signature and proving an
inclusion both start from one value.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from solders.keypair import Keypair

from protocol.canonical import canonical_json, sha256_hex, token_ids_digest
from protocol.job import SamplingParams
from protocol.keys import RECEIPT_DOMAIN, sign, verify

RECEIPT_VERSION = 2


class GpuMetrics(BaseModel):
    """GPU readings sampled while the job ran (absent on CPU-only nodes)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    util_avg: float
    memory_used_mb: int
    power_avg_w: float
    temperature_max_c: float
    samples: int


class ReceiptBody(BaseModel):
    """Everything a node attests about one job. Field names are part of the hash."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: int = RECEIPT_VERSION
    job_id: str
    # the market the job came from (its public host, as in the node link signature): a
    # receipt is worth nothing at another market
    market_id: str
    node_pubkey: str
    model_id: str
    model_sha256: str
    engine: str
    engine_version: str
    sampling: SamplingParams
    request_sha256: str
    output_sha256: str
    output_token_ids_sha256: str
    prompt_tokens: int
    completion_tokens: int
    started_at: float
    finished_at: float
    gpu: GpuMetrics | None = None

    def canonical(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    def digest(self) -> str:
        """Receipt hash: hex sha256 of the canonical body (the Merkle leaf)."""
        return sha256_hex(self.canonical())


class SignedReceipt(BaseModel):
    """A receipt body, its signature, and the token ids whose hash the body holds."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    body: ReceiptBody
    signature: str
    output_token_ids: list[int]

    @property
    def receipt_hash(self) -> str:
        return self.body.digest()

    def signature_valid(self) -> bool:
        return verify(
            self.body.node_pubkey, RECEIPT_DOMAIN, bytes.fromhex(self.receipt_hash), self.signature
        )

    def token_ids_consistent(self) -> bool:
        return (
            token_ids_digest(self.output_token_ids) == self.body.output_token_ids_sha256
            and len(self.output_token_ids) == self.body.completion_tokens
        )


def sign_receipt(keypair: Keypair, body: ReceiptBody, output_token_ids: list[int]) -> SignedReceipt:
    """Sign ``body`` with the node's keypair; the pubkey in the body must be the signer's."""
    if str(keypair.pubkey()) != body.node_pubkey:
        raise ValueError("receipt node_pubkey does not match the signing keypair")
    signature = sign(keypair, RECEIPT_DOMAIN, bytes.fromhex(body.digest()))
    return SignedReceipt(body=body, signature=signature, output_token_ids=list(output_token_ids))


def receipt_from_json(data: dict[str, Any]) -> SignedReceipt:
    return SignedReceipt.model_validate(data)


__all__ = ["GpuMetrics", "ReceiptBody", "SamplingParams", "SignedReceipt", "sign_receipt",
           "receipt_from_json", "RECEIPT_VERSION"]
