"""The protocol sampler as a vLLM logits processor, driven as vLLM drives it (no vLLM).

vLLM calls ``update_state`` with a ``BatchUpdate`` (removed indices, added
``(index, params, prompt_ids, output_ids)`` tuples whose ``output_ids`` is the request's
running output list, moves and swaps) before each step, then ``apply`` on the batch's
logits. For every opted-in row the processed argmax must be exactly
``inference.sampler.sample`` at that row's output position; other rows stay untouched.
And the vLLM adapter now sends sampled jobs as greedy requests carrying those arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from inference import sampler
from inference.convert import generation_request
from inference.vllm import SAMPLER_PROCESSOR, VllmEngine
from inference.vllm_sampler import MoveDirectionality, ProtocolSampler
from tests.support.engines import collect

VOCAB = 1000  # above the sampler's first partial-sort size (256): both nucleus paths run
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Params:
    """The part of vLLM's ``SamplingParams`` the processor reads."""

    extra_args: dict[str, Any] | None = None


@dataclass(frozen=True)
class BatchUpdate:
    """Shaped like ``vllm.v1.sample.logits_processor.BatchUpdate``."""

    batch_size: int
    removed: Sequence[int] = ()
    added: Sequence[tuple[int, Params, list[int] | None, list[int]]] = ()
    moved: Sequence[tuple[int, int, MoveDirectionality]] = ()


@dataclass
class Request:
    """A request as the test tracks it: its args and its running output list."""

    seed: int
    temperature: float
    top_p: float
    start: int = 0
    output: list[int] = field(default_factory=list)

    def params(self) -> Params:
        return Params({"aidp_seed": str(self.seed), "aidp_temperature": self.temperature,
                       "aidp_top_p": self.top_p, "aidp_position": self.start})

    def expected(self, logits: np.ndarray) -> int:
        return sampler.sample(logits, self.temperature, self.top_p,
                              sampler.sampler_key(self.seed), self.start + len(self.output))


def processor() -> ProtocolSampler:
    return ProtocolSampler(None, torch.device("cpu"), False)


def batch_logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * scale


def check_row(out: torch.Tensor, original: torch.Tensor, request: Request) -> None:
    """The row's argmax is the protocol's choice, and it is the only candidate left."""
    want = request.expected(original.numpy())
    assert int(torch.argmax(out)) == want
    assert int(torch.isfinite(out).sum()) == 1


# ---- the interface vLLM calls ------------------------------------------------------------


def test_the_interface_is_the_one_vllm_loads() -> None:
    params = list(inspect.signature(ProtocolSampler.__init__).parameters)
    assert params == ["self", "vllm_config", "device", "is_pin_memory"]
    assert processor().is_argmax_invariant() is False
    # the adapter's --logits-processors value names this class
    module, name = SAMPLER_PROCESSOR.split(":")
    assert getattr(importlib.import_module(module), name) is ProtocolSampler


def test_validate_params_refuses_malformed_arguments_only() -> None:
    ProtocolSampler.validate_params(Params(None))
    ProtocolSampler.validate_params(Params({"other": 1}))
    ProtocolSampler.validate_params(Request(7, 0.8, 0.9, 3).params())
    for bad in ({"aidp_temperature": "hot"}, {"aidp_temperature": 1.0, "aidp_top_p": 0.0},
                {"aidp_temperature": 1.0, "aidp_top_p": 1.5},
                {"aidp_temperature": -1.0}, {"aidp_temperature": 1.0, "aidp_seed": "x"},
                {"aidp_temperature": 1.0, "aidp_position": -1}):
        with pytest.raises(ValueError):
            ProtocolSampler.validate_params(Params(bad))


# ---- the choice -------------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(6))
def test_each_row_argmax_is_the_protocol_choice(trial: int) -> None:
    rng = np.random.default_rng(trial)
    temperatures = [0.3, 0.7, 1.0, 1.5, 2.0]
    top_ps = [0.5, 0.9, 0.95, 1.0]
    requests = {
        # seeds of both signs, and one past int64 (the protocol takes any 64-bit integer)
        index: Request(seed=2**64 - 1 - index if index == 6
                       else int(rng.integers(0, 2**62)) * (-1 if index % 2 else 1),
                       temperature=temperatures[(index + trial) % len(temperatures)],
                       top_p=top_ps[(index * 3 + trial) % len(top_ps)],
                       start=int(rng.integers(0, 40)),
                       output=[int(t) for t in rng.integers(0, VOCAB, int(rng.integers(0, 30)))])
        for index in range(7)
    }
    proc = processor()
    proc.update_state(BatchUpdate(
        batch_size=8,
        added=[(i, r.params(), None, r.output) for i, r in requests.items()]
        + [(7, Params(None), None, [])],
    ))
    for step in range(4):
        original = batch_logits(8, 1000 * trial + step, scale=float(rng.uniform(0.5, 6.0)))
        out = proc.apply(original.clone())
        for index, request in requests.items():
            check_row(out[index], original[index], request)
        assert torch.equal(out[7], original[7])
        for request in requests.values():  # vLLM appends each sampled token to the list
            request.output.append(int(torch.argmax(out[0])))
        proc.update_state(None)  # a step without batch changes


def test_the_position_advances_with_the_output_list() -> None:
    """Same logits every step: only the position moves the choice, so the tokens vary
    and each is the choice at its own position (aidp_position + tokens so far)."""
    request = Request(seed=12345, temperature=1.5, top_p=1.0, start=5)
    proc = processor()
    proc.update_state(BatchUpdate(batch_size=1, added=[(0, request.params(), [1, 2], request.output)]))
    logits = batch_logits(1, 0, scale=0.5)
    key = sampler.sampler_key(12345)
    chosen = []
    for _ in range(12):
        token = int(torch.argmax(proc.apply(logits.clone())[0]))
        chosen.append(token)
        request.output.append(-1)  # async scheduling's placeholder counts the same
    assert chosen == [sampler.sample(logits[0].numpy(), 1.5, 1.0, key, 5 + i) for i in range(12)]
    assert len(set(chosen)) > 3
    assert chosen != [sampler.sample(logits[0].numpy(), 1.5, 1.0, key, i) for i in range(12)]


def test_a_request_without_the_arguments_is_untouched() -> None:
    proc = processor()
    proc.update_state(BatchUpdate(batch_size=3, added=[
        (0, Params(None), None, []), (1, Params({"other": "x"}), None, []),
        (2, Request(1, 1.0, 1.0).params(), None, []),
    ]))
    original = batch_logits(3, 1)
    out = proc.apply(original.clone())
    assert torch.equal(out[:2], original[:2])
    assert not torch.equal(out[2], original[2])
    # nobody opted in: the tensor comes back as it was
    empty = processor()
    empty.update_state(BatchUpdate(batch_size=1, added=[(0, Params(None), None, [])]))
    assert torch.equal(empty.apply(original.clone()), original)


# ---- following the persistent batch ---------------------------------------------------------


def test_removed_and_replaced_rows_drop_their_state() -> None:
    a, b = Request(1, 1.0, 0.9), Request(2, 0.7, 1.0)
    proc = processor()
    proc.update_state(BatchUpdate(batch_size=2, added=[(0, a.params(), None, a.output),
                                                       (1, b.params(), None, b.output)]))
    proc.update_state(BatchUpdate(batch_size=2, removed=[0]))
    original = batch_logits(2, 2)
    out = proc.apply(original.clone())
    assert torch.equal(out[0], original[0])
    check_row(out[1], original[1], b)
    # a request without the arguments takes index 1: it is untouched too
    proc.update_state(BatchUpdate(batch_size=2, added=[(1, Params(None), None, [])]))
    assert torch.equal(proc.apply(original.clone()), original)


def test_a_move_carries_the_state_and_a_swap_exchanges_it() -> None:
    a = Request(11, 1.2, 0.95, start=3, output=[4, 4])
    b = Request(22, 0.6, 1.0, output=[9] * 7)
    gone = Request(33, 1.0, 1.0)
    proc = processor()
    proc.update_state(BatchUpdate(batch_size=4, added=[
        (0, gone.params(), None, gone.output), (1, a.params(), None, a.output),
        (2, Params(None), None, []), (3, b.params(), None, b.output),
    ]))
    # requests 0 and 2 leave; condensing moves the last one (3) into the hole at 0, one
    # way. vLLM's builder drops a hole it fills from ``removed``: the move alone must
    # replace the stale state at 0 and leave none at 3
    proc.update_state(BatchUpdate(batch_size=2, removed=[2],
                                  moved=[(3, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    original = batch_logits(4, 3)
    out = proc.apply(original.clone())
    check_row(out[0], original[0], b)
    check_row(out[1], original[1], a)
    assert torch.equal(out[2:], original[2:])
    # a swap exchanges the two requests' states
    proc.update_state(BatchUpdate(batch_size=2, moved=[(0, 1, MoveDirectionality.SWAP)]))
    out = proc.apply(original.clone())
    check_row(out[0], original[0], a)
    check_row(out[1], original[1], b)
    # a swap with an index that has no state moves the state, leaving the other untouched
    proc.update_state(BatchUpdate(batch_size=3, added=[(2, Params(None), None, [])],
                                  moved=[(1, 2, MoveDirectionality.SWAP)]))
    out = proc.apply(original.clone())
    check_row(out[0], original[0], a)
    assert torch.equal(out[1], original[1])
    check_row(out[2], original[2], b)


# ---- the adapter ------------------------------------------------------------------------------


def test_the_server_command_loads_the_sampler_and_keeps_raw_logprobs() -> None:
    command = VllmEngine("some-model", python="py").command()
    i = command.index("--logits-processors")
    assert command[i + 1] == "inference.vllm_sampler:ProtocolSampler"
    j = command.index("--logprobs-mode")
    assert command[j + 1] == "raw_logprobs"


def test_the_child_can_import_the_sampler(tmp_path, monkeypatch) -> None:
    """vLLM's processes import the class by name: the child's PYTHONPATH has this
    checkout (checked without site-packages, so nothing else could provide it), and the
    V1 model runner, whose processor interface it implements, is selected."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = VllmEngine("some-model").child_env()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    probe = "import importlib.util as u; print(u.find_spec('inference.vllm_sampler').origin)"
    found = subprocess.run([sys.executable, "-S", "-c", probe], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found) == ROOT / "inference" / "vllm_sampler.py"
    del env["PYTHONPATH"]
    missing = subprocess.run([sys.executable, "-S", "-c", probe], env=env, cwd=tmp_path,
                             capture_output=True, text=True, check=False)
    assert missing.returncode != 0  # the probe can fail: without it the child finds nothing


def sse(*chunks: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


async def run_against(engine: VllmEngine, request) -> tuple[list[int], dict[str, Any]]:
    """Generate through the adapter against a stand-in server; the completion body sent."""
    sent: dict[str, Any] = {}
    top = {"token_id:7": -0.1, "token_id:8": -2.5, "token_id:3": -3.0, "token_id:1": -4.0}

    def handler(http: httpx.Request) -> httpx.Response:
        if http.url.path == "/tokenize":
            return httpx.Response(200, json={"tokens": [10, 11, 12]})
        assert http.url.path == "/v1/completions"
        sent.update(json.loads(http.content))
        return httpx.Response(200, text=sse(
            {"choices": [{"text": "a", "finish_reason": None,
                          "logprobs": {"tokens": ["token_id:7"], "top_logprobs": [top]}}]},
            {"choices": [{"text": "", "finish_reason": "length"}]},
        ))

    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                       base_url="http://vllm.test")
    try:
        _, ids, end = await collect(engine, request)
    finally:
        await engine._client.aclose()
        engine._client = None
    assert end is not None and end.completion_tokens == len(ids)
    return ids, sent


async def test_a_sampled_job_goes_to_vllm_as_greedy_with_the_protocol_arguments() -> None:
    """Served, not refused; vLLM samples greedily and the arguments it carries make the
    processor pick the protocol's token at the position after the continuation."""
    seed = 2**64 - 3  # beyond int64 and float precision: sent exactly as a string
    request = generation_request(
        "completion", {"prompt": "hi", "temperature": 0.8, "top_p": 0.9, "seed": seed,
                       "max_tokens": 5},
        continuation_token_ids=[5, 6, 7],
    )
    ids, body = await run_against(VllmEngine("m", model_id="m"), request)
    assert ids == [7]
    assert body["prompt"] == [10, 11, 12, 5, 6, 7]
    assert body["temperature"] == 0 and body["top_p"] == 1
    assert body["logprobs"] == 4 and body["max_tokens"] == 5
    xargs = body["vllm_xargs"]
    assert xargs == {"aidp_seed": str(seed), "aidp_temperature": 0.8, "aidp_top_p": 0.9,
                     "aidp_position": 3}
    assert "seed" not in body  # vLLM's own seed is an int64 (a 400 for this one), and unused
    # what vLLM makes of them: the processor's choice is the protocol's at position 3
    proc = processor()
    output: list[int] = []
    proc.update_state(BatchUpdate(batch_size=1, added=[(0, Params(xargs), body["prompt"], output)]))
    for step in range(5):
        logits = batch_logits(1, 40 + step, scale=1.0)
        want = sampler.sample(logits[0].numpy(), 0.8, 0.9, sampler.sampler_key(seed), 3 + step)
        token = int(torch.argmax(proc.apply(logits.clone())[0]))
        assert token == want
        output.append(token)


async def test_a_greedy_job_is_unchanged() -> None:
    request = generation_request("completion", {"prompt": "hi", "temperature": 0,
                                                "seed": 2**64 - 3, "max_tokens": 3})
    _, body = await run_against(VllmEngine("m", model_id="m"), request)
    assert body["temperature"] == 0 and body["top_p"] == 1
    assert "vllm_xargs" not in body
    assert "seed" not in body  # meaningless when greedy, and vLLM refuses one past int64
