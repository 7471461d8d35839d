"""Computation fingerprints: honest noise against cheats, one JSON line per cell.

    .venv/bin/python bench/fingerprint.py [--jobs 24] [--cheat-jobs 12]

Each honest cell runs a node configuration (the same llama.cpp engine, f16 KV cache,
one thread, transformers on the same GGUF as node or as verifier) and compares its
fingerprint rows (``protocol.fingerprint``) with the verifier's one prefill; each cheat
cell serves with another model (pruned, norm-perturbed, requantised by llama.cpp's own
quantiser) or a shortened / altered prompt. Per cell: the per-job fraction of positions
missing a committed token and the per-job mean |deviation| in nats (min, median, max
over jobs), the numbers ``Tolerances.fingerprint_*`` are set from. The last line is the
summary: the honest maximum, the smallest cheat value per cell and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.convert import generation_request  # noqa: E402
from inference.llamacpp import LlamaCppEngine  # noqa: E402
from market.settings import MarketSettings  # noqa: E402
from market.verify.engine import run_sync  # noqa: E402
from protocol import fingerprint as fp  # noqa: E402
from tests.verification.cheaters import (  # noqa: E402
    DifferentModelEngine,
    PromptAlteringEngine,
    perturbed_gguf,
    pruned_gguf,
    requantised_gguf,
)
from tests.verification.workload import Generated, generate, honest_jobs  # noqa: E402

SYSTEM = ("You are a concise assistant. Answer in plain words, avoid lists, and keep to "
          "the point.")


def _compare(verifier: Any, gen: Generated) -> fp.Comparison:
    tol = MarketSettings().verify.tolerances
    scores = run_sync(verifier.score(generation_request(gen.kind, gen.body), gen.token_ids,
                                     tol.top_k))
    return fp.compare(gen.fingerprint, [s.top for s in scores],
                      margin=tol.fingerprint_margin, window=tol.fingerprint_window)


def cell(label: str, verifier: Any, gens: list[Generated]) -> dict[str, Any]:
    results = [_compare(verifier, g) for g in gens if g.token_ids]
    inc = sorted(r.incomplete_fraction for r in results)
    dev = sorted(r.mean_deviation for r in results)
    row = {"cell": label, "jobs": len(results),
           "incomplete": {"min": round(inc[0], 3), "median": round(inc[len(inc) // 2], 3),
                          "max": round(inc[-1], 3)},
           "mean_dev_nats": {"min": round(dev[0], 4), "median": round(dev[len(dev) // 2], 4),
                             "max": round(dev[-1], 4)}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24, help="honest jobs (mixed parameters)")
    parser.add_argument("--cheat-jobs", type=int, default=12, help="jobs per cheat cell")
    args = parser.parse_args()
    honest = LlamaCppEngine(n_threads=2)
    run_sync(honest.start())
    jobs = honest_jobs(args.jobs, seed=5)
    for kind, body in jobs:  # a system prompt, so that shortening the prompt saves work
        if kind == "chat":
            body["messages"] = [{"role": "system", "content": SYSTEM}, *body["messages"]]
    cheat_jobs = jobs[: args.cheat_jobs]
    honest_rows = [cell("honest:same_engine", honest, [generate(honest, k, b) for k, b in jobs])]
    for label, node in {
        "honest:node_kv_f16": LlamaCppEngine(n_threads=2, kv_f32=False),
        "honest:node_1_thread": LlamaCppEngine(n_threads=1),
    }.items():
        run_sync(node.start())
        honest_rows.append(cell(label, honest, [generate(node, k, b) for k, b in jobs]))
        run_sync(node.close())
    try:
        from inference.transformers import TransformersEngine

        other = TransformersEngine(str(honest.path), model_id=honest.model_id)
        run_sync(other.start())
        gens = [generate(honest, k, b) for k, b in jobs]
        honest_rows.append(cell("honest:verifier_transformers", other, gens))
        honest_rows.append(cell("honest:node_transformers", honest,
                                [generate(other, k, b) for k, b in cheat_jobs]))
        run_sync(other.close())
    except ImportError as exc:
        print(json.dumps({"cell": "honest:transformers", "skipped": str(exc)}))
    cheat_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        models = {
            "cheat:pruned_20_of_30_blocks": lambda: pruned_gguf(20, d / "p20.gguf"),
            "cheat:norms_perturbed_5pct": lambda: perturbed_gguf(0.05, d / "pt05.gguf"),
            "cheat:requantised_q3_k_m": lambda: requantised_gguf("Q3_K_M", d / "q3.gguf"),
            "cheat:requantised_q2_k": lambda: requantised_gguf("Q2_K", d / "q2.gguf"),
        }
        for label, make in models.items():
            node = DifferentModelEngine(make(), honest)
            run_sync(node.start())
            cheat_rows.append(cell(label, honest, [generate(node, k, b) for k, b in cheat_jobs]))
            run_sync(node.inner.close())
    for mode in ("shorten", "alter"):
        node = PromptAlteringEngine(honest, mode)
        node.model = honest.model
        cheat_rows.append(cell(f"cheat:prompt_{mode}", honest,
                               [generate(node, k, b) for k, b in cheat_jobs]))
    honest_max = max(r["mean_dev_nats"]["max"] for r in honest_rows)
    print(json.dumps({"summary": {
        "honest_mean_dev_max": honest_max,
        "honest_incomplete_max": max(r["incomplete"]["max"] for r in honest_rows),
        "bytes_per_32_tokens": 32 * fp.ROW_BYTES,
        "cheats": {r["cell"]: {
            "mean_dev_min": r["mean_dev_nats"]["min"],
            "incomplete_median": r["incomplete"]["median"],
            "mean_dev_min_over_honest_max": round(r["mean_dev_nats"]["min"] / honest_max, 2)
            if honest_max else None} for r in cheat_rows}}}))


if __name__ == "__main__":
    main()
