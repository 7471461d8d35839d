"""Verification of an embedding job: recompute the vectors, compare them by cosine.

Nothing is sampled, so there is no distribution to judge: the verifier embeds the same
inputs with the same weights (float32, its own tokenizer — the market's) and every
vector the node returned must point where the verifier's does, within
``Tolerances.embedding_min_cosine``, and be as long as the verifier's within one minus
that (cosine alone would pass a vector scaled by any factor). The tolerance is measured, not guessed
(``bench/embedding.py``): honest nodes (other batch sizes, thread counts) agree to
within float32 rounding, while cheaper computations (fewer layers, noisy or requantised
weights, other pooling) fall well below it.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from inference.base import EngineError
from inference.embedding import SentenceEmbedder
from market.settings import Tolerances
from protocol.embedding import EmbeddingRequest, MalformedVectors, cosine, decode_vectors
from protocol.receipt import SignedReceipt

# evidence lists at most this many failing inputs
MAX_EVIDENCE = 32


def judge_embedding(embedder: SentenceEmbedder, receipt: SignedReceipt,
                    request: EmbeddingRequest, output: str,
                    tolerances: Tolerances) -> tuple[str, dict[str, Any], str]:
    """(outcome, evidence, reason) for one embedding receipt: honest | fraud | unavailable.
    The cheap checks (signature, hashes) are the caller's, as for generations."""
    body = receipt.body
    evidence: dict[str, Any] = {"verifier": {"engine": embedder.name,
                                             "engine_version": embedder.version,
                                             "model_sha256": embedder.model.sha256}}
    if embedder.model.sha256.lower() != body.model_sha256.lower():
        evidence["unavailable"] = "the verifier holds other weights"
        return "unavailable", evidence, "verification unavailable: other weights"
    if body.request_sha256 != request.digest():
        evidence["checks"] = [{"code": "request_hash_mismatch",
                               "detail": "the receipt signs another request than the job's"}]
        return "fraud", evidence, "the receipt signs another request"
    token_ids = embedder.tokenizer.encode(request.inputs)
    tokens = sum(len(ids) for ids in token_ids)
    if body.prompt_tokens != tokens:
        evidence["checks"] = [{"code": "prompt_tokens_mismatch",
                               "detail": f"receipt {body.prompt_tokens}, inputs {tokens}"}]
        return "fraud", evidence, "the receipt counts other tokens than the inputs hold"
    try:
        claimed = decode_vectors(output, len(request.inputs), embedder.dimensions)
    except MalformedVectors as exc:
        evidence["checks"] = [{"code": "bad_vectors", "detail": str(exc)}]
        return "fraud", evidence, f"the vectors are malformed: {exc}"
    try:
        raw = embedder.embed_sync(token_ids)
    except EngineError as exc:
        evidence["unavailable"] = str(exc)
        return "unavailable", evidence, f"verification unavailable: {exc}"
    own = array("f")
    own.frombytes(raw)
    width = embedder.dimensions
    mine = [own[i * width:(i + 1) * width] for i in range(len(claimed))]
    cosines = [cosine(vector, ref) for vector, ref in zip(claimed, mine, strict=True)]
    # cosine ignores length: a vector scaled (or left unnormalised) points the same way
    scales = [_norm(vector) / max(_norm(ref), 1e-12) for vector, ref in zip(claimed, mine,
                                                                           strict=True)]
    floor = tolerances.embedding_min_cosine
    failed = [i for i, (c, k) in enumerate(zip(cosines, scales, strict=True))
              if c < floor or abs(k - 1.0) > 1.0 - floor]
    evidence["embedding"] = {
        "inputs": len(cosines), "min_cosine": round(min(cosines), 6),
        "mean_cosine": round(sum(cosines) / len(cosines), 6), "min_cosine_tol": floor,
        "max_length_ratio_off": round(max(abs(k - 1.0) for k in scales), 6),
        "failed": [{"index": i, "cosine": round(cosines[i], 6), "length_ratio": round(scales[i], 6)}
                   for i in failed[:MAX_EVIDENCE]],
    }
    if failed:
        return "fraud", evidence, (f"re-execution: {len(failed)} of {len(cosines)} vectors "
                                   f"off the verifier's (cosine below {floor} or length off "
                                   f"by more than {1.0 - floor:g}; lowest cosine "
                                   f"{min(cosines):.4f})")
    return "honest", evidence, "verified honest"


def _norm(vector: Any) -> float:
    return math.sqrt(sum(x * x for x in vector))
