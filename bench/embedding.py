"""How far honest embeddings may sit from the verifier's, and how far cheap ones fall.

The verifier recomputes every vector of a sampled embedding job and needs each one's
cosine with its own to reach ``Tolerances.embedding_min_cosine``. This measures, over a
set of inputs of varied length, the lowest cosine of honest variants (other batch
sizes, one thread, inputs in another order: other padding) and of cheaper computations
that claim the same weights (``tests.verification.cheaters.CheapEmbedder``), and the
share of each cheater's vectors below the tolerance; plus what verifying costs against
serving (both one forward pass: the ratio is about 1).

    python bench/embedding.py [--inputs 64]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference import embedding as embedding_mod  # noqa: E402
from inference.embedding import SentenceEmbedder  # noqa: E402
from market.settings import Tolerances  # noqa: E402
from tests.verification.cheaters import CheapEmbedder  # noqa: E402

WORDS = ("market node receipt verifier token stake vector GPU model the a of to and in "
         "settles quickly honest cheater price buyer operator slashing window proof "
         "Solana inference batch latency").split()


def inputs(count: int) -> list[str]:
    """Deterministic texts of 3 to ~180 words (short queries to long passages)."""
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(WORDS, size=int(3 + (i * 37) % 180)))
            for i in range(count)]


def vectors(model: SentenceEmbedder, token_ids: list[list[int]]) -> np.ndarray:
    raw = model.embed_sync(token_ids)
    return np.frombuffer(raw, dtype="<f4").reshape(len(token_ids), -1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def summary(values: np.ndarray, floor: float) -> dict[str, Any]:
    return {"min_cosine": round(float(values.min()), 7),
            "mean_cosine": round(float(values.mean()), 7),
            "below_tolerance": round(float((values < floor).mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=64)
    args = parser.parse_args()
    floor = Tolerances().embedding_min_cosine
    verifier = SentenceEmbedder(threads=2)
    asyncio.run(verifier.start())
    texts = inputs(args.inputs)
    ids = verifier.tokenizer.encode(texts)
    t0 = time.perf_counter()
    reference = vectors(verifier, ids)
    serve_s = time.perf_counter() - t0

    honest: dict[str, Any] = {}
    one_by_one = np.concatenate([vectors(verifier, [x]) for x in ids])
    honest["batch_1"] = summary(cosines(one_by_one, reference), floor)
    order = list(reversed(range(len(ids))))
    reversed_vectors = vectors(verifier, [ids[i] for i in order])[np.argsort(order)]
    honest["reversed_order"] = summary(cosines(reversed_vectors, reference), floor)
    embedding_mod.BATCH_SIZE, saved = 8, embedding_mod.BATCH_SIZE
    honest["batch_8"] = summary(cosines(vectors(verifier, ids), reference), floor)
    embedding_mod.BATCH_SIZE = saved
    single = SentenceEmbedder(threads=1)
    asyncio.run(single.start())
    honest["threads_1"] = summary(cosines(vectors(single, ids), reference), floor)

    # not the protocol's float32, but what an operator might run on a GPU: how close
    precision: dict[str, Any] = {}
    for dtype in ("bfloat16", "float16"):
        import torch

        other = CheapEmbedder(verifier)
        other._net = other._net.to(getattr(torch, dtype))
        precision[dtype] = summary(cosines(vectors(other, ids), reference), floor)
    cheats = {"layers_5_of_6": {"layers": 5}, "layers_3_of_6": {"layers": 3},
              "int8_dynamic": {"quantized": True}, "weights_noise_1pct": {"noise": 0.01},
              "weights_noise_5pct": {"noise": 0.05}, "cls_pooling": {"pooling": "cls"},
              "first_32_tokens": {"truncate": 32}}
    cheaters: dict[str, Any] = {}
    for name, kwargs in cheats.items():
        cheat = CheapEmbedder(verifier, **kwargs)
        t0 = time.perf_counter()
        claimed = vectors(cheat, ids)
        cheat_s = time.perf_counter() - t0
        cheaters[name] = {**summary(cosines(claimed, reference), floor),
                          "cost_vs_honest": round(cheat_s / serve_s, 3)}
    t0 = time.perf_counter()
    vectors(verifier, ids)
    verify_s = time.perf_counter() - t0
    print(json.dumps({
        "model": verifier.model.id, "inputs": len(texts),
        "tokens": sum(len(x) for x in ids), "tolerance_min_cosine": floor,
        "honest": honest, "other_precision": precision, "cheaters": cheaters,
        "honest_max_below_tolerance": max(h["below_tolerance"] for h in honest.values()),
        "verify_vs_serve_time": round(verify_s / serve_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
