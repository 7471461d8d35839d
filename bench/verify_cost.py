"""What re-execution costs against generation, for any engine (CPU or GPU).

Verification scores a claimed output with one prefill over prompt + output; the node
generated it one token at a time. This measures both, for the same jobs, with the
engine a verifier would run: llama.cpp on CPU, transformers on a GPU.

    python bench/verify_cost.py [--engine llamacpp|transformers] [--model-path P]
                                [--device cuda] [--jobs 8] [--max-tokens 256]

Prints one JSON object: per-job generation and scoring seconds and the ratio
scoring / generation over all jobs (target <= 1/20).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.base import Engine, GenerationRequest, TokenDelta  # noqa: E402
from inference.convert import generation_request  # noqa: E402
from market.settings import MarketSettings  # noqa: E402
from node_agent.engines import create_engine  # noqa: E402
from node_agent.settings import NodeSettings  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a transformer language model works.",
    "List the planets of the solar system and one fact about each.",
    "Describe the water cycle for a ten-year-old.",
]


async def generate(engine: Engine, request: GenerationRequest) -> tuple[list[int], float]:
    ids: list[int] = []
    start = time.perf_counter()
    async for event in engine.generate(request):
        if isinstance(event, TokenDelta):
            ids.extend(event.token_ids)
    return ids, time.perf_counter() - start


async def score(engine: Engine, request: GenerationRequest, ids: list[int]) -> float:
    """The verifier's one prefill, as ``market.verify.reexec`` runs it (its top-k, and
    the protocol sampler's check of every sampled token)."""
    tol = MarketSettings().verify.tolerances
    start = time.perf_counter()
    await engine.score(request, ids, top_k=tol.top_k, nucleus_noise=tol.sampler_nucleus_noise)
    return time.perf_counter() - start


def job(i: int, max_tokens: int, temperature: float = 0.0) -> GenerationRequest:
    return generation_request("chat", {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens, "temperature": temperature, "seed": i})


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    settings = NodeSettings(engine=args.engine, model_path=args.model_path, device=args.device,
                            n_ctx=2048, **({"model": args.model} if args.model else {}))
    engine = create_engine(settings)
    await engine.start()
    try:
        warm, _ = await generate(engine, job(0, 16))  # kernels, allocator, caches
        await score(engine, job(0, 16), warm)
        jobs = []
        for i in range(args.jobs):
            request = job(i, args.max_tokens, args.temperature)
            ids, gen_s = await generate(engine, request)
            score_s = await score(engine, request, ids)
            jobs.append({"tokens": len(ids), "generate_s": round(gen_s, 4),
                         "score_s": round(score_s, 4)})
    finally:
        await engine.close()
    gen_total = sum(j["generate_s"] for j in jobs)
    score_total = sum(j["score_s"] for j in jobs)
    return {
        "engine": engine.name, "engine_version": engine.version, "model": engine.model.id,
        "device": args.device, "temperature": args.temperature,
        "cpu_count": os.cpu_count(), "jobs": jobs,
        "generate_s": round(gen_total, 3), "score_s": round(score_total, 3),
        "score_over_generate": round(score_total / gen_total, 4) if gen_total else None,
        "target": 1 / 20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="llamacpp", choices=["llamacpp", "transformers"])
    parser.add_argument("--model-path", default=None,
                        help="GGUF, HF directory, or a directory with config.json + tokenizer "
                             "(random weights)")
    parser.add_argument("--model", default=None, help="model id (defaults to the engine's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="> 0: sampled jobs, whose scoring also checks every token "
                             "against the protocol sampler")
    print(json.dumps(asyncio.run(main_async(parser.parse_args())), indent=1))


if __name__ == "__main__":
    main()
