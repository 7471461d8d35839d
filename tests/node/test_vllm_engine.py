"""The vLLM adapter against a real vLLM OpenAI server (marker ``vllm``).

Runs when vLLM is usable: importable here, or a python with vLLM given in
``AIDP_TEST_VLLM_PYTHON`` (the adapter starts it as a child), or a running server in
``AIDP_TEST_VLLM_URL``. The model is ``AIDP_TEST_VLLM_MODEL`` (an HF directory or name;
default: a float32 HF copy of the SmolLM2 GGUF written into a temp dir).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import pytest_asyncio

from inference.convert import generation_request
from tests.support.engines import collect

VLLM_URL = os.environ.get("AIDP_TEST_VLLM_URL")
VLLM_PYTHON = os.environ.get("AIDP_TEST_VLLM_PYTHON") or (
    sys.executable if importlib.util.find_spec("vllm") is not None else None
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not (VLLM_URL or VLLM_PYTHON), reason="vLLM is not installed here"),
]


def smollm2_hf_dir(target) -> str:
    """Write the SmolLM2 GGUF as an HF float32 directory vLLM can load."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.llamacpp import default_gguf

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.config.save_pretrained(target)
    tok.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    config.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return str(target)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory):
    from inference.vllm import VllmEngine

    model = os.environ.get("AIDP_TEST_VLLM_MODEL") or smollm2_hf_dir(tmp_path_factory.mktemp("hf"))
    engine = VllmEngine(
        model,
        model_id="SmolLM2-135M-Instruct",
        base_url=VLLM_URL,
        python=VLLM_PYTHON,
        n_ctx=2048,
        extra_args="--dtype float32 --gpu-memory-utilization 0.3",
        startup_timeout=900,
    )
    await engine.start()
    yield engine
    await engine.close()


run = collect


async def test_vllm_generate_continue_score(engine) -> None:
    body = {
        "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
        "max_tokens": 24,
        "temperature": 0,
    }
    request = generation_request("chat", body)
    text, ids, end = await run(engine, request)
    assert len(ids) == end.completion_tokens > 0 and text
    assert engine.version.startswith("vllm/")
    cont = generation_request("chat", dict(body, max_tokens=24 - 6), continuation_token_ids=ids[:6])
    _, rest, _ = await run(engine, cont)
    assert ids[:6] + rest == ids
    scores = await engine.score(request, ids, top_k=5)
    assert [s.token_id for s in scores] == ids
    assert sum(s.top[0][0] == s.token_id for s in scores) >= len(ids) - 1
