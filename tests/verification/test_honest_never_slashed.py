"""An honest node is never judged fraudulent: 200 real llama.cpp generations with mixed
parameters (temperature 0 / 0.7 / 1.0, top_p 1 / 0.9 / 0.5, seeds, max_tokens 8–40,
stop strings, chat and completion), each re-executed by the verifier."""

from __future__ import annotations

import json

import pytest

from market.settings import MarketSettings
from tests.verification.workload import generate, honest_jobs, verify

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)
def test_200_honest_jobs_pass(honest_engine, artifacts_dir) -> None:
    tol = MarketSettings().verify.tolerances
    failures = []
    stats = {"greedy_max_gap": 0.0, "sampled_max_z": -1e9, "min_eog_tempered": 0.0,
             "stops_checked": 0, "gen_s": 0.0, "score_s": 0.0}
    jobs = honest_jobs(200, seed=2026)
    for kind, body in jobs:
        gen = generate(honest_engine, kind, body)
        verdict, seconds = verify(honest_engine, honest_engine, gen, tol)
        stats["gen_s"] += gen.gen_s
        stats["score_s"] += seconds
        s = verdict.stats
        if s.get("max_argmax_gap") is not None:
            stats["greedy_max_gap"] = max(stats["greedy_max_gap"], s["max_argmax_gap"])
        if s.get("z") is not None:
            stats["sampled_max_z"] = max(stats["sampled_max_z"], s["z"])
        if s.get("stop_checked"):
            stats["stops_checked"] += 1
            if s.get("eog_tempered_logprob") is not None:
                stats["min_eog_tempered"] = min(stats["min_eog_tempered"],
                                                s["eog_tempered_logprob"])
        if verdict.fraud:
            failures.append({"body": body, "text": gen.text, "reasons": verdict.reasons})
    (artifacts_dir / "verification-honest-200.json").write_text(json.dumps(
        {"jobs": len(jobs), "false_positives": len(failures), "stats": stats,
         "failures": failures}, indent=1))
    assert not failures, json.dumps(failures[:3], indent=1)
    # The margins the tolerances leave (measured here, asserted loosely).
    assert stats["greedy_max_gap"] < tol.greedy_logprob_tol
    assert stats["sampled_max_z"] < tol.z_threshold
    assert stats["stops_checked"] > 0
