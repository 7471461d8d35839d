"""The transformers engine on the same SmolLM2 GGUF: it must agree with llama.cpp.

Transformers dequantizes the Q4_1 weights and runs them in float32, llama.cpp runs
the quantized kernels, so logits differ a little; greedy outputs of llama.cpp must
still score as (near-)argmax under transformers. The measured differences go to
test-artifacts/transformers-vs-llamacpp.json.
"""

from __future__ import annotations

import json

import pytest
import pytest_asyncio

from inference.convert import generation_request
from inference.llamacpp import LlamaCppEngine
from inference.transformers import TransformersEngine
from tests.node.conftest import cpu_threads
from tests.support.engines import collect

pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

PROMPTS = [
    "Write a haiku about the sea.",
    "What is 2+2?",
    "Name three colors.",
    "Explain gravity in one sentence.",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines():
    import torch

    torch.set_num_threads(cpu_threads())
    tf = TransformersEngine(device="cpu")
    lc = LlamaCppEngine(n_threads=cpu_threads(), n_ctx=2048)
    await tf.start()
    await lc.start()
    yield tf, lc
    await tf.close()
    await lc.close()


async def run(engine, request):
    text, ids, _ = await collect(engine, request)
    return text, ids


def chat(content: str, max_tokens: int = 32) -> dict:
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def test_same_model_identity_prompt_and_tokens(engines) -> None:
    tf, lc = engines
    assert tf.model.sha256 == lc.model.sha256  # the same GGUF file
    request = generation_request("chat", chat(PROMPTS[0]))
    assert tf.render_prompt(request) == lc.render_prompt(request)
    assert tf.prompt_token_ids(request) == lc.prompt_token_ids(request)
    _, ids = await run(lc, request)
    assert tf.decode(ids) == lc.decode(ids)
    assert set(lc.eog_token_ids()) >= set(tf.eog_token_ids())
    # every token spells the same bytes on both (control tokens none): the market checks a
    # node's text against the GGUF vocabulary, whichever engine the node runs
    assert [tf.piece(t) for t in range(lc.vocab_size())] == \
        [lc.vocabulary.piece(t) for t in range(lc.vocab_size())]


async def test_transformers_scores_llamacpp_greedy_outputs(engines, artifacts_dir) -> None:
    tf, lc = engines
    rows = []
    for content in PROMPTS:
        request = generation_request("chat", chat(content, 40))
        _, ids = await run(lc, request)
        tf_scores = await tf.score(request, ids, top_k=5)
        lc_scores = await lc.score(request, ids, top_k=5)
        for t, c in zip(tf_scores, lc_scores, strict=True):
            rows.append(
                {
                    "argmax": t.top[0][0] == t.token_id,
                    "gap": t.top[0][1] - t.logprob,
                    "diff": t.logprob - c.logprob,
                }
            )
    n = len(rows)
    hits = sum(r["argmax"] for r in rows)
    max_gap = max(r["gap"] for r in rows)
    diffs = sorted(abs(r["diff"]) for r in rows)
    summary = {
        "positions": n,
        "argmax_agreement": hits,
        "max_gap_to_top": max_gap,
        "logprob_abs_diff_mean": sum(diffs) / n,
        "logprob_abs_diff_p50": diffs[n // 2],
        "logprob_abs_diff_p99": diffs[min(n - 1, int(n * 0.99))],
        "logprob_abs_diff_max": diffs[-1],
    }
    (artifacts_dir / "transformers-vs-llamacpp.json").write_text(json.dumps(summary, indent=1))
    print(summary)
    assert hits / n >= 0.95
    assert max_gap < 0.5
    assert summary["logprob_abs_diff_mean"] < 0.2


async def test_llamacpp_sampled_tokens_follow_the_sampler_on_transformers_numbers(
        engines, artifacts_dir) -> None:
    """Cross-engine honesty at temperature > 0: a llama.cpp node's sampled tokens are the
    protocol sampler's choice on transformers' numbers too, within the verifier's
    tolerance, and a different seed's tokens are not."""
    from market.settings import Tolerances

    tf, lc = engines
    tol = Tolerances()
    worst, wrong_seed_worst = [], []
    for i, content in enumerate(PROMPTS):
        for temperature, top_p in [(1.0, 1.0), (0.7, 0.9)]:
            body = {**chat(content, 24), "temperature": temperature, "top_p": top_p, "seed": i}
            request = generation_request("chat", body)
            _, ids = await run(lc, request)
            scores = await tf.score(request, ids, top_k=5,
                                    nucleus_noise=tol.sampler_nucleus_noise)
            worst.append(max(s.sampler_excess for s in scores))
            other = generation_request("chat", {**body, "seed": i + 1000})
            scores = await tf.score(other, ids, top_k=5, nucleus_noise=tol.sampler_nucleus_noise)
            wrong_seed_worst.append(max(s.sampler_excess for s in scores))
    (artifacts_dir / "sampler-transformers-vs-llamacpp.json").write_text(json.dumps(
        {"max_excess_honest": worst, "max_excess_wrong_seed": wrong_seed_worst}, indent=1))
    assert max(worst) <= tol.sampler_tol, worst
    # tokens drawn with other noise are caught in most jobs (short, peaked outputs may not be)
    assert sum(w > tol.sampler_tol for w in wrong_seed_worst) >= len(wrong_seed_worst) // 2


async def test_transformers_generation_and_continuation(engines) -> None:
    tf, _ = engines
    request = generation_request("chat", chat(PROMPTS[1], 16))
    text, ids = await run(tf, request)
    assert ids and tf.decode(ids) == text
    cont = generation_request("chat", chat(PROMPTS[1], 16 - 5), continuation_token_ids=ids[:5])
    _, rest = await run(tf, cont)
    assert ids[:5] + rest == ids
    scores = await tf.score(request, ids, top_k=3)
    assert all(s.top[0][0] == s.token_id for s in scores)  # its own greedy output


async def test_random_weights_from_a_config(tmp_path) -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    engine = TransformersEngine(path, model_id="tiny-random", device="cpu")
    await engine.start()
    assert engine.random_weights and engine.model.quantization == "random"
    assert engine.model.context_length == 512
    request = generation_request("chat", chat("hi", 6))
    text, ids = await run(engine, request)
    assert len(ids) <= 6 and engine.decode(ids) == text
    again = TransformersEngine(path, model_id="tiny-random", device="cpu")
    await again.start()
    assert again.model.sha256 == engine.model.sha256  # config + seed identify the weights
    assert (await run(again, request))[1] == ids


async def test_both_engines_refuse_ids_outside_one_vocabulary(engines) -> None:
    from inference.base import EngineError

    tf, lc = engines
    assert tf.vocab_size() == lc.vocab_size() == 49152
    request = generation_request("chat", chat(PROMPTS[1], 4))
    for bad in (-1, tf.vocab_size()):
        with pytest.raises(EngineError, match="outside the vocabulary"):
            await tf.score(request, [bad])
        with pytest.raises(EngineError, match="outside the vocabulary"):
            await run(tf, generation_request("chat", chat(PROMPTS[1], 4), [bad]))
        with pytest.raises(EngineError, match="outside the vocabulary"):
            tf.decode([bad])


async def test_both_engines_compile_one_grammar_mask_and_agree_on_constrained_jobs(
        engines) -> None:
    """A constrained job judged across engines: both token tables give the grammar the
    same pieces (so the mask is the same function of the prefix), and a llama.cpp
    node's constrained, penalised output is within tolerance on transformers' numbers."""
    from market.settings import Tolerances

    tf, lc = engines
    assert [tf.piece(t) for t in range(tf.vocab_size())] == [
        lc.vocabulary.piece(t) for t in range(lc.vocab_size())]
    # llama.cpp also ends on one more control token (id 4): a mask difference only at
    # positions where the document is whole, on a token no claimed output holds
    assert set(tf.eog_token_ids()) <= set(lc.eog_token_ids())
    tol = Tolerances()
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    for temperature in (0.0, 1.0):
        body = {**chat("Describe a person as JSON.", 32), "temperature": temperature,
                "seed": 3, "frequency_penalty": 0.5,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "p", "schema": schema}}}
        request = generation_request("chat", body)
        _, ids = await run(lc, request)
        scores = await tf.score(request, ids, top_k=5, nucleus_noise=tol.sampler_nucleus_noise)
        assert min(s.logprob for s in scores) > -50  # no token the mask forbids
        if temperature == 0.0:
            assert max(s.top[0][1] - s.logprob for s in scores) <= tol.greedy_logprob_tol
        else:
            assert max(s.sampler_excess for s in scores) <= tol.sampler_tol
