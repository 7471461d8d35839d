"""Honest nodes are never slashed: many mixed jobs across both CPU engines, each judged
by the full verifier (text, ids, stop, prompt count, protocol sampler, fingerprint) on
both engines.

    .venv/bin/python bench/honest.py [--jobs 1000] [--context-full 16] [--threads 2]
                                     [--shard K/N]
    .venv/bin/python bench/honest.py --merge shard0.jsonl shard1.jsonl ...

Node configurations take the jobs in turn: llama.cpp as the verifier runs it (f32 KV
cache, 2 threads), llama.cpp with llama.cpp's default f16 KV cache, llama.cpp on one
thread, and transformers on the same GGUF. Every job is re-executed by a llama.cpp
verifier and by a transformers verifier, so each engine judges the other's outputs as
well as its own. Context-full jobs come from nodes whose context is 64 tokens, asked
for more than fits: they end with ``length`` short of ``max_tokens``, honestly.

Prints one JSON line per (node, verifier) cell — jobs, false positives, and how close
the honest jobs came to each tolerance — and a summary line last. False positives are
written in full to the cell's ``failures`` (at most 5 a cell). ``--shard K/N`` runs
every N-th job from the K-th (processes on a machine of many cores); ``--merge`` sums
the shards' cell lines (or their ``--checkpoint`` files) into one set of cells and a
summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.base import Engine  # noqa: E402
from inference.llamacpp import LlamaCppEngine  # noqa: E402
from market.settings import MarketSettings  # noqa: E402
from market.verify.engine import run_sync  # noqa: E402
from tests.verification.workload import Generated, generate, honest_jobs, verify  # noqa: E402

SMALL_CONTEXT = 64
CONTEXT_FULL_PROMPTS = ["Write a long story about a cat.", "Describe a city at night.",
                        "Explain how rain forms, in detail."]
# the stats each verdict reports, and whether the tolerance bounds them from above
MARGINS = {
    "max_argmax_gap": max, "z": max, "excess_nats_per_token": max,
    "max_sampler_excess": max, "fingerprint_mean_dev": max, "fingerprint_max_dev": max,
    "fingerprint_incomplete": max, "eog_sampler_excess": max, "eog_tempered_logprob": min,
}


def _node_engines(threads: int) -> dict[str, Engine]:
    from inference.transformers import TransformersEngine

    return {
        "llamacpp": LlamaCppEngine(n_threads=threads),
        "llamacpp_kv_f16": LlamaCppEngine(n_threads=threads, kv_f32=False),
        "llamacpp_1_thread": LlamaCppEngine(n_threads=1),
        "transformers": TransformersEngine(device="cpu"),
    }


def _context_full_engines(threads: int) -> dict[str, Engine]:
    from inference.transformers import TransformersEngine

    return {
        "llamacpp": LlamaCppEngine(n_threads=threads, n_ctx=SMALL_CONTEXT),
        "transformers": TransformersEngine(device="cpu", n_ctx=SMALL_CONTEXT),
    }


def _context_full_jobs(n: int) -> list[tuple[str, dict[str, Any]]]:
    jobs = []
    for i in range(n):
        temperature = (0.0, 0.7, 1.0)[i % 3]
        jobs.append(("chat", {
            "messages": [{"role": "user", "content": CONTEXT_FULL_PROMPTS[i % 3]}],
            "max_tokens": 200, "temperature": temperature, "seed": 500 + i,
            **({"top_p": 0.9} if i % 2 else {})}))
    return jobs


class Cell:
    """False positives and the closest approach to each tolerance, for one (node,
    verifier) pair."""

    def __init__(self, node: str, verifier: str) -> None:
        self.node, self.verifier = node, verifier
        self.jobs = self.context_full = self.false_positives = 0
        self.failures: list[dict[str, Any]] = []
        self.margins: dict[str, float] = {}
        self.gen_s = self.score_s = 0.0

    def add(self, gen: Generated, verdict: Any, seconds: float, context_full: bool) -> None:
        self.jobs += 1
        self.context_full += context_full
        self.gen_s += gen.gen_s
        self.score_s += seconds
        for key, pick in MARGINS.items():
            value = verdict.stats.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                self.margins[key] = pick(self.margins.get(key, value), value)
        if verdict.fraud:
            self.false_positives += 1
            if len(self.failures) < 5:
                self.failures.append({"body": gen.body, "text": gen.text,
                                      "finish_reason": gen.finish_reason,
                                      "reasons": verdict.reasons})

    def row(self) -> dict[str, Any]:
        return {"cell": f"node={self.node} verifier={self.verifier}",
                "node": self.node, "verifier": self.verifier, "jobs": self.jobs,
                "context_full_jobs": self.context_full,
                "false_positives": self.false_positives,
                "margins": {k: round(v, 5) for k, v in sorted(self.margins.items())},
                "generation_s": round(self.gen_s, 3), "scoring_s": round(self.score_s, 3),
                "scoring_over_generation": round(self.score_s / self.gen_s, 4)
                if self.gen_s else None,
                "failures": self.failures}

    def merge(self, row: dict[str, Any]) -> None:
        """Add another shard's line for the same (node, verifier)."""
        self.jobs += row["jobs"]
        self.context_full += row["context_full_jobs"]
        self.false_positives += row["false_positives"]
        self.failures = (self.failures + row["failures"])[:5]
        self.gen_s += row["generation_s"]
        self.score_s += row["scoring_s"]
        for key, value in row["margins"].items():
            pick = MARGINS[key]
            self.margins[key] = pick(self.margins.get(key, value), value)


def _checkpoint(cells: dict[tuple[str, str], Cell], path: Path | None) -> None:
    """The cells so far, rewritten after every job: a run stopped early keeps its count."""
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(c.row()) + "\n" for c in cells.values()))
        tmp.replace(path)


def _judge_all(cells: dict[tuple[str, str], Cell], node_label: str, node: Engine,
               verifiers: dict[str, Engine], jobs: list[tuple[str, dict[str, Any]]],
               context_length: int | None, tol: Any, checkpoint: Path | None) -> None:
    for kind, body in jobs:
        gen = generate(node, kind, body)
        full = bool(context_length and gen.prompt_tokens + len(gen.token_ids)
                    >= context_length)
        for verifier_label, verifier in verifiers.items():
            verdict, seconds = verify(verifier, node, gen, tol, context_length=context_length)
            cell = cells.setdefault((node_label, verifier_label),
                                    Cell(node_label, verifier_label))
            cell.add(gen, verdict, seconds, full)
        _checkpoint(cells, checkpoint)


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="honest jobs (mixed parameters)")
    parser.add_argument("--context-full", type=int, default=16,
                        help="extra jobs from small-context nodes that fill their context")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2027, help="the workload's seed")
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th job from the K-th")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="rewrite the cell lines to this file after every job")
    parser.add_argument("--merge", nargs="*", type=Path, default=None,
                        help="shard outputs (JSON lines) to sum instead of running")
    args = parser.parse_args()
    if args.merge:
        _print_summary(_merged(args.merge), args, started=time.time())
        return
    shard, shards = (int(x) for x in args.shard.split("/"))

    import torch

    from inference.transformers import TransformersEngine

    torch.set_num_threads(args.threads)
    tol = MarketSettings().verify.tolerances
    verifiers: dict[str, Engine] = {"llamacpp": LlamaCppEngine(n_threads=args.threads),
                                    "transformers": TransformersEngine(device="cpu")}
    for engine in verifiers.values():
        run_sync(engine.start())
    cells: dict[tuple[str, str], Cell] = {}
    jobs = honest_jobs(args.jobs, seed=args.seed)
    full_jobs = _context_full_jobs(args.context_full)
    for engines, workload, context in ((_node_engines(args.threads), jobs, None),
                                       (_context_full_engines(args.threads), full_jobs,
                                        SMALL_CONTEXT)):
        for index, (label, node) in enumerate(engines.items()):
            # job i goes to node i mod len(engines), and to this process if i mod N == K
            mine = [job for i, job in enumerate(workload)
                    if i % len(engines) == index and i % shards == shard]
            if not mine:
                continue
            run_sync(node.start())
            name = label if context is None else f"{label}_ctx{context}"
            _judge_all(cells, name, node, verifiers, mine, context, tol, args.checkpoint)
            run_sync(node.close())
    for cell in cells.values():
        print(json.dumps(cell.row()), flush=True)
    _print_summary(cells, args, started)


def _merged(paths: list[Path]) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.startswith('{"cell"'):
                continue
            row = json.loads(line)
            key = (row["node"], row["verifier"])
            cells.setdefault(key, Cell(*key)).merge(row)
    for cell in cells.values():
        print(json.dumps(cell.row()), flush=True)
    return cells


def _print_summary(cells: dict[tuple[str, str], Cell], args: argparse.Namespace,
                   started: float) -> None:
    tol = MarketSettings().verify.tolerances
    print(json.dumps({
        "summary": {
            "verdicts": sum(c.jobs for c in cells.values()),
            "jobs": sum(c.jobs for c in cells.values()) // 2,  # each job has two verifiers
            "context_full_verdicts": sum(c.context_full for c in cells.values()),
            "false_positives": sum(c.false_positives for c in cells.values()),
            "target": 0, "shard": None if args.merge else args.shard,
            "tolerances": tol.model_dump(),
            "wall_s": round(time.time() - started, 1),
        }}), flush=True)


if __name__ == "__main__":
    main()
