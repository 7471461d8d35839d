"""Receipts: built from what the node streamed, signed, verifiable by protocol code."""

from __future__ import annotations

import os
import time

import pytest
from solders.keypair import Keypair

from inference.convert import BadRequest, generation_request
from inference.weights import weights_sha256
from node_agent.receipts import build_receipt
from protocol import fingerprint
from protocol.canonical import sha256_hex, token_ids_digest
from protocol.job import request_digest
from protocol.receipt import GpuMetrics, SignedReceipt, receipt_from_json
from tests.support.engines import DeterministicEngine


def make(keypair: Keypair, **overrides) -> SignedReceipt:
    request = generation_request(
        "chat",
        {
            "messages": [{"role": "user", "content": "hé"}],
            "max_tokens": 5,
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
            "stop": "END",
        },
        continuation_token_ids=[7, 8],
    )
    values = dict(
        keypair=keypair,
        job_id="job-1",
        market_id="market.example",
        engine=DeterministicEngine(),
        request=request,
        output_text=" w1 w2é",
        output_token_ids=[1, 2],
        fingerprint=fingerprint.encode_row([(1, -0.1), (2, -2.5)]) * 2,
        prompt_tokens=11,
        started_at=1000.0,
        finished_at=1001.5,
        gpu=GpuMetrics(
            name="NVIDIA H100",
            util_avg=80.5,
            memory_used_mb=1024,
            power_avg_w=300.0,
            temperature_max_c=60.0,
            samples=4,
        ),
    )
    values.update(overrides)
    return build_receipt(**values)


def test_receipt_fields_and_signature(keypair: Keypair) -> None:
    receipt = make(keypair)
    body = receipt.body
    assert receipt.signature_valid() and receipt.token_ids_consistent()
    assert body.node_pubkey == str(keypair.pubkey())
    assert body.request_sha256 == request_digest(
        "chat", [{"role": "user", "content": "hé"}], [7, 8]
    )
    assert body.output_sha256 == sha256_hex(" w1 w2é")
    assert body.output_token_ids_sha256 == token_ids_digest([1, 2])
    assert body.completion_tokens == 2 and body.prompt_tokens == 11
    assert body.sampling.model_dump() == {
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 5,
        "seed": 3,
        "stop": ["END"],
    }
    assert body.engine == "deterministic" and body.model_id == "test-model"
    assert body.gpu is not None and body.gpu.samples == 4
    # survives the wire
    again = receipt_from_json(receipt.model_dump(mode="json"))
    assert again.signature_valid() and again.receipt_hash == receipt.receipt_hash


@pytest.mark.parametrize(
    "field,value",
    [
        ("output_sha256", "0" * 64),
        ("completion_tokens", 3),
        ("job_id", "job-2"),
        ("model_sha256", "f" * 64),
        ("finished_at", 1002.0),
    ],
)
def test_tampering_breaks_the_signature(keypair: Keypair, field: str, value) -> None:
    receipt = make(keypair)
    forged = receipt.model_copy(update={"body": receipt.body.model_copy(update={field: value})})
    assert not forged.signature_valid()


def test_other_keys_signature_is_rejected(keypair: Keypair) -> None:
    receipt = make(keypair)
    other = make(Keypair())
    mixed = receipt.model_copy(update={"signature": other.signature})
    assert not mixed.signature_valid()
    swapped_ids = receipt.model_copy(update={"output_token_ids": [2, 1]})
    assert not swapped_ids.token_ids_consistent()


def test_weights_hash_is_cached_by_path_mtime_size(tmp_path, monkeypatch) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"weights" * 1000)
    calls = []
    from inference import weights as weights_module

    real = weights_module._hash_file
    monkeypatch.setattr(weights_module, "_hash_file", lambda p: calls.append(p) or real(p))
    cache = tmp_path / "cache"
    first = weights_sha256(weights, cache)
    assert first == sha256_hex(b"weights" * 1000)
    assert weights_sha256(weights, cache) == first and len(calls) == 1  # cached
    assert (cache / "weights-sha256.json").exists()
    weights.write_bytes(b"other" * 1000)
    os.utime(weights, (time.time() + 5, time.time() + 5))
    second = weights_sha256(weights, cache)
    assert second == sha256_hex(b"other" * 1000) and len(calls) == 2  # recomputed


def test_weights_hash_of_a_directory(tmp_path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"a")
    (tmp_path / "b.bin").write_bytes(b"b")
    (tmp_path / "config.json").write_text("{}")
    digest = weights_sha256(tmp_path, tmp_path / "cache")
    (tmp_path / "b.bin").write_bytes(b"c")
    assert weights_sha256(tmp_path, tmp_path / "cache") != digest


def test_text_content_parts_render_as_their_text() -> None:
    parts = [{"type": "text", "text": "Write a haiku"}, {"type": "text", "text": "about the sea."}]
    r = generation_request("chat", {"messages": [{"role": "user", "content": parts}]})
    text = "Write a haiku\nabout the sea."
    assert r.messages == [{"role": "user", "content": text}]
    # the digest covers the text the model reads
    assert r.digest() == request_digest("chat", [{"role": "user", "content": text}])


def test_openai_body_conversion_defaults_and_errors() -> None:
    r = generation_request("chat", {"messages": [{"role": "user", "content": "x"}]})
    assert (r.temperature, r.top_p, r.max_tokens, r.seed, r.stop) == (1.0, 1.0, 256, None, [])
    r = generation_request(
        "completion",
        {
            "prompt": ["p"],
            "max_completion_tokens": 9,
            "stop": ["a", "b"],
            "temperature": 0,
            "seed": 4,
        },
    )
    assert (r.prompt, r.max_tokens, r.stop, r.greedy, r.seed) == ("p", 9, ["a", "b"], True, 4)
    assert r.digest() == request_digest("completion", "p", [])
    for kind, body in [
        ("chat", {"messages": []}),
        ("chat", {"messages": "x"}),
        ("completion", {"prompt": 3}),
        ("completion", {"prompt": "x", "max_tokens": -1}),
        ("completion", {"prompt": "x", "top_p": 0}),
        ("completion", {"prompt": "x", "stop": 5}),
        ("completion", {"prompt": "x", "temperature": "hot"}),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("chat", {"messages": [{"role": "user", "content": 7}]}),
        ("embed", {}),
    ]:
        with pytest.raises(BadRequest):
            generation_request(kind, body)
