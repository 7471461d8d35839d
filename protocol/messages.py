"""Node link wire messages (WebSocket ``/v1/node/link``, one JSON object per frame).

The node dials out, so no port is opened on operators' machines. Every frame has a
``type``; :func:`parse_message` turns a frame into the matching model and rejects
anything else with a ``pydantic.ValidationError``.

Sequence: node ``hello`` → market ``challenge`` → node ``auth`` → market ``welcome``
(or ``reject``), then ``status`` heartbeats from the node and ``job``/``cancel`` from
the market, answered by ``chunk``… then ``done`` or ``error``; ``embed`` jobs (texts to
vectors, ``protocol.embedding``) are answered by one ``embedded`` or ``error``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    field_validator,
    model_serializer,
    model_validator,
)

from protocol.embedding import EmbeddingRequest
from protocol.job import MAX_TOP_LOGPROBS, FinishReason, JobRequest, Usage
from protocol.receipt import SignedReceipt

# 4: sampled tokens are drawn by the protocol sampler (inference.sampler) from the job's
# seed; a node that samples otherwise would be slashed, so older nodes are refused
# 5: receipts carry the computation fingerprint (protocol.fingerprint); the market
# refuses receipts without one
PROTOCOL_VERSION = 5


class _Message(BaseModel):
    # NaN and infinity are not JSON numbers a peer may send: they cannot be hashed
    # canonically, so a frame carrying one is malformed
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Capabilities(_Message):
    """What a node's engine does beyond plain generation; the router sends a job only to
    nodes that declare what it needs (absent in older nodes' hellos: nothing)."""

    # the grammar engine (``inference.grammar.GRAMMAR_ENGINE``): response_format served
    grammar: str | None = Field(default=None, max_length=64)
    logit_shaping: bool = False  # presence/frequency penalties and logit_bias
    logprobs: bool = False  # per-token log-probabilities with up to MAX_TOP_LOGPROBS


class ModelOffer(_Message):
    id: str
    sha256: str
    engine: str
    quantization: str | None = None
    context_length: int  # for an embedding model: the most tokens one input may have
    capabilities: Capabilities = Field(default_factory=Capabilities)
    # "embedding": the model turns texts into vectors (``embed`` jobs), of ``dimensions``
    task: Literal["generation", "embedding"] = "generation"
    dimensions: int | None = Field(default=None, ge=1, le=65_536)

    @model_validator(mode="after")
    def _dimensions_for_embeddings(self) -> ModelOffer:
        if (self.task == "embedding") != (self.dimensions is not None):
            raise ValueError("an embedding model has dimensions, a generation model none")
        return self

    @model_serializer(mode="wrap")
    def _generation_as_before(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A generation offer's hello is what it was before embeddings existed (a market
        of the same protocol version that knows no ``task`` still takes it)."""
        data = handler(self)
        if isinstance(data, dict) and self.task == "generation":
            data.pop("task", None)
            data.pop("dimensions", None)
        return data


class GpuInfo(_Message):
    name: str
    vram_mb: int


class Price(_Message):
    """AIDP base units per one million tokens."""

    input: int = Field(ge=0)
    output: int = Field(ge=0)


class GpuSample(_Message):
    name: str
    util_pct: float
    memory_used_mb: int
    temperature_c: float
    power_w: float


# ---- node → market -------------------------------------------------------------


class Hello(_Message):
    type: Literal["hello"] = "hello"
    protocol_version: int = PROTOCOL_VERSION
    pubkey: str
    agent_version: str
    models: list[ModelOffer] = Field(min_length=1, max_length=64)
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    price: Price
    max_concurrency: int = Field(ge=1)
    region: str = Field(default="local", max_length=64)

    @field_validator("models")
    @classmethod
    def _one_offer_per_model(cls, models: list[ModelOffer]) -> list[ModelOffer]:
        if len({m.id for m in models}) != len(models):
            raise ValueError("each model may be offered once")
        return models


class Auth(_Message):
    """Base58 ed25519 signature of ``LINK_AUTH_DOMAIN + link_auth_message(host, nonce)``
    (``protocol.keys``), where ``host`` is the market host the node dialed."""

    type: Literal["auth"] = "auth"
    signature: str


class Status(_Message):
    type: Literal["status"] = "status"
    running: int = Field(ge=0)
    queued: int = Field(ge=0)
    tokens_per_s: float = 0.0
    kv_cache_usage: float | None = None
    gpus: list[GpuSample] = Field(default_factory=list)


class TokenLogprob(_Message):
    """One output token's log-probability under the model (temperature 1, before any
    shaping) and the ``top`` (id, log-probability) pairs, most likely first."""

    token_id: int
    logprob: float = Field(le=0)
    top: list[tuple[int, float]] = Field(default_factory=list, max_length=MAX_TOP_LOGPROBS)


class Chunk(_Message):
    type: Literal["chunk"] = "chunk"
    job_id: str
    text: str
    token_ids: list[int]
    # present when the job asked for log-probabilities: one per token id
    logprobs: list[TokenLogprob] | None = None

    @model_validator(mode="after")
    def _one_logprob_per_token(self) -> Chunk:
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError("a chunk carries one logprobs entry per token id")
        return self


class Done(_Message):
    type: Literal["done"] = "done"
    job_id: str
    usage: Usage
    finish_reason: FinishReason
    receipt: SignedReceipt


class Embedded(_Message):
    """The answer to ``embed``: the vectors (``protocol.embedding``: float32 little-endian,
    base64, input order) and the signed receipt whose ``output_sha256`` is their hash."""

    type: Literal["embedded"] = "embedded"
    job_id: str
    output: str
    usage: Usage
    receipt: SignedReceipt


class JobError(_Message):
    type: Literal["error"] = "error"
    job_id: str
    code: str
    message: str


# ---- market → node -------------------------------------------------------------


class Challenge(_Message):
    type: Literal["challenge"] = "challenge"
    nonce: str  # 32 random bytes, hex


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    node_id: str
    heartbeat_interval: float
    market_id: str  # the market's identity (its public host), named in receipts
    max_frame_bytes: int  # the largest frame the market accepts on this link


class Reject(_Message):
    type: Literal["reject"] = "reject"
    reason: str


class Job(_Message):
    """One generation. ``continuation_token_ids`` are output earlier nodes already
    streamed before failing: the node continues after them and streams only new tokens;
    ``request.sampling.max_tokens`` is what is left."""

    type: Literal["job"] = "job"
    job_id: str
    request: JobRequest
    deadline: float  # unix seconds
    continuation_token_ids: list[int] = Field(default_factory=list)


class EmbedJob(_Message):
    """One embedding job: every input of the request, embedded by one node."""

    type: Literal["embed"] = "embed"
    job_id: str
    request: EmbeddingRequest
    deadline: float  # unix seconds


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    job_id: str


NodeMessage = Annotated[Union[Hello, Auth, Status, Chunk, Done, Embedded, JobError],
                        Field(discriminator="type")]
MarketMessage = Annotated[Union[Challenge, Welcome, Reject, Job, EmbedJob, Cancel],
                          Field(discriminator="type")]

_node_adapter: TypeAdapter[Any] = TypeAdapter(NodeMessage)
_market_adapter: TypeAdapter[Any] = TypeAdapter(MarketMessage)


def parse_node_message(raw: str | bytes
                       ) -> Hello | Auth | Status | Chunk | Done | Embedded | JobError:
    """Parse a frame sent by a node (raises ``pydantic.ValidationError``)."""
    return _node_adapter.validate_json(raw)


def parse_market_message(raw: str | bytes
                         ) -> Challenge | Welcome | Reject | Job | EmbedJob | Cancel:
    """Parse a frame sent by the market (raises ``pydantic.ValidationError``)."""
    return _market_adapter.validate_json(raw)


def encode(message: _Message) -> str:
    return message.model_dump_json()
