"""Receipts: the node signs, the market verifies with the same code."""

from __future__ import annotations

import pytest
from solders.keypair import Keypair

from protocol.canonical import canonical_json, sha256_hex, token_ids_digest
from protocol.job import request_digest
from protocol.keys import (
    LINK_AUTH_DOMAIN,
    RECEIPT_DOMAIN,
    canonical_host,
    link_auth_message,
    load_keypair,
    save_keypair,
    sign,
    verify,
)
from protocol.receipt import ReceiptBody, SamplingParams, sign_receipt


def make_body(keypair: Keypair, **overrides: object) -> ReceiptBody:
    token_ids = [5, 6, 7]
    fields: dict[str, object] = dict(
        job_id="job-1",
        market_id="market.example",
        node_pubkey=str(keypair.pubkey()),
        model_id="SmolLM2-135M-Instruct",
        model_sha256="ab" * 32,
        engine="llamacpp",
        engine_version="0.3",
        sampling=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=16),
        request_sha256=request_digest("chat", [{"role": "user", "content": "hi"}]),
        output_sha256=sha256_hex("hello there"),
        output_token_ids_sha256=token_ids_digest(token_ids),
        prompt_tokens=9,
        completion_tokens=3,
        started_at=1.0,
        finished_at=2.0,
    )
    fields.update(overrides)
    return ReceiptBody(**fields)  # type: ignore[arg-type]


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_request_digest_ignores_extra_message_fields_but_not_content() -> None:
    base = [{"role": "user", "content": "hi"}]
    assert request_digest("chat", base) == request_digest("chat", [{**base[0], "name": "x"}])
    assert request_digest("chat", base) != request_digest("chat", [{"role": "user", "content": "hi!"}])
    assert request_digest("chat", base) != request_digest("chat", base, [1])


def test_signed_receipt_verifies_and_tampering_breaks_it() -> None:
    keypair = Keypair()
    signed = sign_receipt(keypair, make_body(keypair), [5, 6, 7])
    assert signed.signature_valid()
    assert signed.token_ids_consistent()

    tampered = signed.model_copy(
        update={"body": signed.body.model_copy(update={"output_sha256": sha256_hex("edited")})}
    )
    assert not tampered.signature_valid()

    wrong_ids = signed.model_copy(update={"output_token_ids": [5, 6, 8]})
    assert not wrong_ids.token_ids_consistent()


def test_receipt_survives_json_round_trip() -> None:
    keypair = Keypair()
    signed = sign_receipt(keypair, make_body(keypair), [5, 6, 7])
    again = type(signed).model_validate_json(signed.model_dump_json())
    assert again.receipt_hash == signed.receipt_hash
    assert again.signature_valid()


def test_cannot_sign_for_another_pubkey() -> None:
    with pytest.raises(ValueError):
        sign_receipt(Keypair(), make_body(Keypair()), [5, 6, 7])


def test_signature_domains_do_not_cross() -> None:
    keypair = Keypair()
    message = bytes(32)
    link_sig = sign(keypair, LINK_AUTH_DOMAIN, message)
    assert verify(str(keypair.pubkey()), LINK_AUTH_DOMAIN, message, link_sig)
    assert not verify(str(keypair.pubkey()), RECEIPT_DOMAIN, message, link_sig)
    assert not verify("not-a-key", LINK_AUTH_DOMAIN, message, link_sig)
    assert not verify(str(keypair.pubkey()), LINK_AUTH_DOMAIN, message, "garbage")


def test_keypair_file_round_trip(tmp_path) -> None:
    keypair = Keypair()
    path = save_keypair(keypair, tmp_path / "id.json")
    assert load_keypair(path).pubkey() == keypair.pubkey()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        save_keypair(Keypair(), path)
    (tmp_path / "bad.json").write_text("[1,2,3]")
    with pytest.raises(ValueError):
        load_keypair(tmp_path / "bad.json")


def test_link_auth_names_the_market_host() -> None:
    nonce = bytes(range(32))
    assert canonical_host("Market.Example:443") == "market.example"
    assert canonical_host("market.example:80") == "market.example"
    assert canonical_host("127.0.0.1:8000") == "127.0.0.1:8000"
    assert canonical_host("[::1]:8000") == "[::1]:8000"
    assert link_auth_message("market.example:443", nonce) == link_auth_message("MARKET.example", nonce)
    assert link_auth_message("a.example", nonce) != link_auth_message("b.example", nonce)
