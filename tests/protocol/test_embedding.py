"""The embedding job contract: what a body becomes, how vectors travel and are read."""

from __future__ import annotations

import base64
import math
import struct

import pytest

from protocol.embedding import (
    MAX_EMBEDDING_INPUTS,
    EmbeddingRequest,
    MalformedVectors,
    cosine,
    decode_vectors,
    encode_vectors,
    encoding_format,
)
from protocol.job import InvalidJobRequest
from protocol.messages import ModelOffer


def test_a_string_or_a_list_of_strings_becomes_the_inputs() -> None:
    assert EmbeddingRequest.from_openai({"model": "m", "input": "hi"}).inputs == ["hi"]
    assert EmbeddingRequest.from_openai({"model": "m", "input": ["a", "b"]}).inputs == ["a", "b"]


@pytest.mark.parametrize("raw, param", [
    ([1, 2], "input[0]"), ([[1, 2]], "input[0]"), ("", "input"), (["a", ""], "input[1]"),
    ([], "input"), (None, "input"), (["x"] * (MAX_EMBEDDING_INPUTS + 1), "input"),
])
def test_what_cannot_be_embedded_names_the_input(raw: object, param: str) -> None:
    with pytest.raises(InvalidJobRequest) as info:
        EmbeddingRequest.from_openai({"model": "m", "input": raw})
    assert info.value.param == param


def test_the_digest_covers_the_inputs_and_their_order() -> None:
    a = EmbeddingRequest(model="m", inputs=["x", "y"])
    assert a.digest() == EmbeddingRequest(model="other", inputs=["x", "y"]).digest()
    assert a.digest() != EmbeddingRequest(model="m", inputs=["y", "x"]).digest()


def test_vectors_round_trip_as_float32_little_endian() -> None:
    raw = struct.pack("<6f", 0.5, -1.0, 2.0, 0.0, 1e-3, 3.25)
    vectors = decode_vectors(encode_vectors(raw), 2, 3)
    assert [list(v) for v in vectors] == [[0.5, -1.0, 2.0], [0.0, pytest.approx(1e-3), 3.25]]
    assert base64.b64decode(encode_vectors(raw)) == raw


@pytest.mark.parametrize("output, count, dims", [
    ("not base64!", 1, 2),
    (encode_vectors(struct.pack("<3f", 1, 2, 3)), 2, 2),  # too few values
    (encode_vectors(struct.pack("<2f", 1, math.nan)), 1, 2),
    (encode_vectors(struct.pack("<2f", 1, math.inf)), 1, 2),
])
def test_malformed_vectors_are_refused(output: str, count: int, dims: int) -> None:
    with pytest.raises(MalformedVectors):
        decode_vectors(output, count, dims)


def test_cosine_and_formats() -> None:
    assert cosine([1, 0], [2, 0]) == pytest.approx(1.0)
    assert cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert cosine([0, 0], [1, 1]) == 0.0
    assert encoding_format({}) == "float"
    with pytest.raises(InvalidJobRequest):
        encoding_format({"encoding_format": "int8"})


def test_an_offer_says_its_task_and_a_generation_offer_is_unchanged_on_the_wire() -> None:
    plain = ModelOffer(id="m", sha256="a" * 64, engine="e", context_length=8)
    assert "task" not in plain.model_dump() and "dimensions" not in plain.model_dump_json()
    vectors = ModelOffer(id="m", sha256="a" * 64, engine="e", context_length=8,
                         task="embedding", dimensions=384)
    assert vectors.model_dump()["dimensions"] == 384
    assert ModelOffer.model_validate_json(vectors.model_dump_json()) == vectors
    with pytest.raises(ValueError):
        ModelOffer(id="m", sha256="a" * 64, engine="e", context_length=8, task="embedding")
