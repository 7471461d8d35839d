"""Cheap receipt checks (pure): every tampering is reported, an honest receipt passes."""

from __future__ import annotations

import base64
import time

from solders.keypair import Keypair

from protocol import fingerprint
from protocol.canonical import sha256_hex, token_ids_digest
from protocol.checks import check_receipt
from protocol.job import JobRequest, request_digest
from protocol.receipt import ReceiptBody, SamplingParams, sign_receipt

MESSAGES = [{"role": "user", "content": "hi"}]
SHA = "ab" * 32


def _sampling(fields: dict) -> SamplingParams:
    """What the market expects a node to attest for a body with these fields."""
    return JobRequest.from_openai("chat", {"model": "m", "messages": MESSAGES, **fields}).sampling


def _signed(keypair: Keypair | None = None, **overrides):
    keypair = keypair or Keypair()
    ids = [5, 6, 7]
    fields = dict(
        job_id="job_1", market_id="market.example", node_pubkey=str(keypair.pubkey()),
        model_id="m", model_sha256=SHA,
        engine="llamacpp", engine_version="1",
        sampling=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=8),
        request_sha256=request_digest("chat", MESSAGES), output_sha256=sha256_hex("abc"),
        output_token_ids_sha256=token_ids_digest(ids), prompt_tokens=4, completion_tokens=3,
        started_at=time.time() - 1, finished_at=time.time(),
    )
    fields.update(overrides)
    return keypair, sign_receipt(keypair, ReceiptBody(**fields), ids)


def _check(signed, keypair, **kw):
    args = dict(
        registered_model_sha256=SHA, request_sha256=request_digest("chat", MESSAGES),
        relayed_text="abc", relayed_token_ids=[5, 6, 7], node_pubkey=str(keypair.pubkey()),
        job_id="job_1", model_id="m", usage={"prompt_tokens": 4, "completion_tokens": 3},
        finish_reason="stop",
        expected_sampling=_sampling({"temperature": 0, "max_tokens": 8}),
    )
    args.update(kw)
    return {f.code for f in check_receipt(signed, **args)}


def test_honest_receipt_passes() -> None:
    keypair, signed = _signed()
    assert _check(signed, keypair) == set()


def test_each_tampering_is_reported() -> None:
    keypair, signed = _signed()
    assert _check(signed, keypair, relayed_text="abd") == {"output_hash_mismatch"}
    assert _check(signed, keypair, registered_model_sha256="cd" * 32) == {"model_sha_mismatch"}
    assert _check(signed, keypair, request_sha256=request_digest("chat", [])) == {
        "request_hash_mismatch"}
    assert _check(signed, keypair, relayed_token_ids=[5, 6]) == {"token_ids_not_relayed"}
    assert _check(signed, keypair, node_pubkey=str(Keypair().pubkey())) == {"wrong_node"}
    assert _check(signed, keypair, usage={"prompt_tokens": 4, "completion_tokens": 9}) == {
        "usage_mismatch"}
    assert _check(signed, keypair, finish_reason="length") == {"truncated"}
    assert _check(signed, keypair, finish_reason="length", context_length=7) == set()
    assert _check(signed, keypair, expected_sampling=_sampling(
        {"temperature": 0.7, "max_tokens": 8})) == {"sampling_mismatch"}

    # A body edited after signing: the signature no longer verifies.
    forged = signed.model_copy(update={"body": signed.body.model_copy(
        update={"output_sha256": sha256_hex("abd")})})
    assert "bad_signature" in _check(forged, keypair, relayed_text="abd")
    # Token ids swapped beside the body.
    swapped = signed.model_copy(update={"output_token_ids": [5, 6, 8]})
    assert _check(swapped, keypair, relayed_token_ids=[5, 6, 8]) == {"token_ids_hash_mismatch"}
    # Counts that disagree with the ids, signed by the node itself.
    keypair2, lying = _signed(completion_tokens=2)
    assert "token_count_mismatch" in _check(lying, keypair2,
                                            usage={"prompt_tokens": 4, "completion_tokens": 2})


def test_sampling_defaults_follow_openai() -> None:
    params = _sampling({"stop": "\n", "max_completion_tokens": 5})
    assert (params.temperature, params.top_p, params.max_tokens, params.stop) == (
        1.0, 1.0, 5, ["\n"])


def test_the_fingerprint_is_required_hashed_and_one_row_a_token() -> None:
    rows = b"".join(fingerprint.encode_row([(t, -0.1)]) for t in (5, 6, 7))
    keypair = Keypair()
    _, bare = _signed(keypair)
    assert _check(bare, keypair) == set()  # older receipts: checked only when required
    assert _check(bare, keypair, require_fingerprint=True) == {"fingerprint_missing"}

    body = bare.body.model_copy(update={"fingerprint_sha256": fingerprint.digest(rows)})
    good = sign_receipt(keypair, body, [5, 6, 7], rows)
    assert _check(good, keypair, require_fingerprint=True) == set()

    other = base64.b64encode(rows[:-1] + b"\x01").decode()
    assert _check(good.model_copy(update={"fingerprint": other}), keypair) == {
        "fingerprint_hash_mismatch"}
    assert _check(good.model_copy(update={"fingerprint": "not base64!"}), keypair) == {
        "fingerprint_missing"}
    short = rows[:-8]
    body = bare.body.model_copy(update={"fingerprint_sha256": fingerprint.digest(short)})
    assert _check(sign_receipt(keypair, body, [5, 6, 7], short), keypair) == {
        "fingerprint_length_mismatch"}
