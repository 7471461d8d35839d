"""The receipt a node posts for every job, and how it is hashed and signed.

The receipt hash (sha256 of the canonical body) is the Merkle leaf anchored on
chain; the node signs that same hash, so checking a signature and proving an
inclusion both start from one value.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from pydantic import BaseModel, ConfigDict
from solders.keypair import Keypair

from protocol import fingerprint as fp
from protocol.canonical import canonical_json, sha256_hex, token_ids_digest
from protocol.job import SamplingParams
from protocol.keys import RECEIPT_DOMAIN, sign, verify

# 3: the computation fingerprint (protocol.fingerprint) is signed by its hash
RECEIPT_VERSION = 3


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
    # protocol.fingerprint.digest of the rows; absent only in receipts from before it
    fingerprint_sha256: str | None = None

    def canonical(self) -> bytes:
        data = self.model_dump(mode="json")
        if data["fingerprint_sha256"] is None:
            del data["fingerprint_sha256"]  # receipts from before it keep their hash
        return canonical_json(data)

    def digest(self) -> str:
        """Receipt hash: hex sha256 of the canonical body (the Merkle leaf)."""
        return sha256_hex(self.canonical())


class SignedReceipt(BaseModel):
    """A receipt body, its signature, and the token ids whose hash the body holds."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    body: ReceiptBody
    signature: str
    output_token_ids: list[int]
    # the fingerprint rows, base64 (8 bytes a token; field elements do not compress)
    fingerprint: str | None = None

    @property
    def receipt_hash(self) -> str:
        return self.body.digest()

    def signature_valid(self) -> bool:
        return verify(
            self.body.node_pubkey, RECEIPT_DOMAIN, bytes.fromhex(self.receipt_hash), self.signature
        )

    def fingerprint_bytes(self) -> bytes | None:
        """The fingerprint rows, or None when absent or not base64."""
        if self.fingerprint is None:
            return None
        try:
            return base64.b64decode(self.fingerprint, validate=True)
        except (binascii.Error, ValueError):
            return None

    def token_ids_consistent(self) -> bool:
        return (
            token_ids_digest(self.output_token_ids) == self.body.output_token_ids_sha256
            and len(self.output_token_ids) == self.body.completion_tokens
        )


def sign_receipt(keypair: Keypair, body: ReceiptBody, output_token_ids: list[int],
                 fingerprint: bytes | None = None) -> SignedReceipt:
    """Sign ``body`` with the node's keypair; the pubkey in the body must be the signer's.
    ``fingerprint``: the rows whose digest the body holds."""
    if str(keypair.pubkey()) != body.node_pubkey:
        raise ValueError("receipt node_pubkey does not match the signing keypair")
    if fingerprint is not None and body.fingerprint_sha256 != fp.digest(fingerprint):
        raise ValueError("receipt fingerprint_sha256 does not match the fingerprint")
    signature = sign(keypair, RECEIPT_DOMAIN, bytes.fromhex(body.digest()))
    encoded = base64.b64encode(fingerprint).decode() if fingerprint is not None else None
    return SignedReceipt(body=body, signature=signature, output_token_ids=list(output_token_ids),
                         fingerprint=encoded)


def receipt_from_json(data: dict[str, Any]) -> SignedReceipt:
    return SignedReceipt.model_validate(data)


__all__ = ["GpuMetrics", "ReceiptBody", "SamplingParams", "SignedReceipt", "sign_receipt",
           "receipt_from_json", "RECEIPT_VERSION"]
