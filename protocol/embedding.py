"""The embedding job contract: texts in, one vector per text out, receipted like a
generation.

An embedding job's *output* is the vectors as the buyer receives them: float32,
little-endian, concatenated in input order, base64 (OpenAI's ``encoding_format:
"base64"`` spelling, per vector). The receipt's ``output_sha256`` is the sha256 of that
base64 text, so the market checks it exactly as it checks a generation's text, and the
verifier recomputes the vectors and compares them by cosine (``market.verify``).
Nothing here imports numpy: the market reads vectors with the standard library.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.canonical import digest_json
from protocol.job import InvalidJobRequest, SamplingParams

# OpenAI's bound on inputs per request
MAX_EMBEDDING_INPUTS = 2048
# an embedding receipt attests these (nothing is sampled, nothing generated)
EMBEDDING_SAMPLING = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=0)
FLOAT_BYTES = 4

EncodingFormat = Literal["float", "base64"]


class EmbeddingRequest(BaseModel):
    """What a buyer asked to embed. ``inputs`` are texts, in the order the vectors come
    back; the request digest covers them and nothing else the model does not read."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    kind: Literal["embedding"] = "embedding"
    model: str
    inputs: list[str] = Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)

    def digest(self) -> str:
        """The receipt's ``request_sha256``."""
        return digest_json({"kind": self.kind, "input": list(self.inputs)})

    @classmethod
    def from_openai(cls, body: Mapping[str, Any]) -> EmbeddingRequest:
        """Build the job from an OpenAI ``/v1/embeddings`` body (raises InvalidJobRequest).

        ``input`` is a string or a list of strings; token-id arrays are refused (a
        market cannot bill or verify ids of a tokenizer it did not run), as is an empty
        string (OpenAI refuses it too)."""
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            raise InvalidJobRequest("input must be a string or a non-empty list of strings",
                                    "input")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise InvalidJobRequest(f"input holds at most {MAX_EMBEDDING_INPUTS} texts", "input")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidJobRequest("input must be text: token-id arrays are not served",
                                        f"input[{index}]" if isinstance(raw, list) else "input")
            if not text:
                raise InvalidJobRequest("an input text may not be empty",
                                        f"input[{index}]" if isinstance(raw, list) else "input")
        return cls(model=str(body.get("model") or ""), inputs=list(texts))


def encoding_format(body: Mapping[str, Any]) -> EncodingFormat:
    """OpenAI's ``encoding_format`` (default float)."""
    value = body.get("encoding_format", "float") or "float"
    if value not in ("float", "base64"):
        raise InvalidJobRequest("encoding_format must be 'float' or 'base64'",
                                "encoding_format")
    return value  # type: ignore[no-any-return]


def encode_vectors(values: bytes) -> str:
    """The job output for the raw float32 little-endian bytes of every vector."""
    return base64.b64encode(values).decode("ascii")


class MalformedVectors(ValueError):
    """An embedding output that is not ``count`` finite vectors of ``dimensions``."""


def decode_vectors(output: str, count: int, dimensions: int) -> list[array[float]]:
    """The vectors of a job output, checked: exactly ``count`` × ``dimensions`` finite
    float32 values (raises :class:`MalformedVectors`)."""
    try:
        raw = base64.b64decode(output, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedVectors("the vectors are not base64") from None
    if len(raw) != count * dimensions * FLOAT_BYTES:
        raise MalformedVectors(f"{len(raw)} bytes of vectors; {count} vectors of "
                               f"{dimensions} float32 are {count * dimensions * FLOAT_BYTES}")
    values = array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    if not all(math.isfinite(v) for v in values):
        raise MalformedVectors("a vector holds NaN or infinity")
    return [values[i * dimensions:(i + 1) * dimensions] for i in range(count)]


def vector_base64(vector: Sequence[float]) -> str:
    """One vector as OpenAI's base64 encoding_format sends it (float32 little-endian)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; 0 when either vector is zero (nothing to agree on)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm > 0 else 0.0


__all__ = ["EMBEDDING_SAMPLING", "MAX_EMBEDDING_INPUTS", "EmbeddingRequest", "MalformedVectors",
           "cosine", "decode_vectors", "encode_vectors", "encoding_format", "vector_base64"]
