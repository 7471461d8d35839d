"""Cheap receipt checks, run by the market when a node sends ``done``.

Pure functions, no I/O: a :class:`~protocol.receipt.SignedReceipt` against what the
market itself relayed and what the node registered. Every failure is returned (not
just the first) so the evidence stored for a rejected receipt is complete.

Usage::

    failures = check_receipt(
        signed,
        job_id=job.id,
        node_pubkey=node.pubkey,
        registered_model_sha256=offer.sha256,
        request_sha256=job_request.digest(continuation_ids),
        relayed_text="".join(chunk.text for chunk in chunks),
        relayed_token_ids=[t for chunk in chunks for t in chunk.token_ids],
        usage=done.usage,
        finish_reason=done.finish_reason,
        expected_sampling=job_request.sampling,
    )
    if failures: reject
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from protocol import fingerprint as fp
from protocol.canonical import sha256_hex, token_ids_digest
from protocol.receipt import SamplingParams, SignedReceipt

# Relative slack when comparing floats the node echoes back (temperature, top_p).
_FLOAT_EPS = 1e-6


@dataclass(frozen=True)
class CheckFailure:
    """One failed check: a stable machine code and a human sentence."""

    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _FLOAT_EPS * max(1.0, abs(a), abs(b))


def check_sampling(claimed: SamplingParams, expected: SamplingParams) -> list[CheckFailure]:
    """The node must attest exactly the sampling parameters it was sent.

    A node claiming ``temperature=1`` for a greedy request would otherwise escape the
    strict greedy re-execution check.
    """
    failures: list[CheckFailure] = []
    if not _close(claimed.temperature, expected.temperature):
        failures.append(
            CheckFailure(
                "sampling_mismatch",
                f"receipt temperature {claimed.temperature} != requested {expected.temperature}",
            )
        )
    if not _close(claimed.top_p, expected.top_p):
        failures.append(
            CheckFailure(
                "sampling_mismatch", f"receipt top_p {claimed.top_p} != requested {expected.top_p}"
            )
        )
    if claimed.max_tokens != expected.max_tokens:
        failures.append(
            CheckFailure(
                "sampling_mismatch",
                f"receipt max_tokens {claimed.max_tokens} != requested {expected.max_tokens}",
            )
        )
    if claimed.seed != expected.seed:
        failures.append(
            CheckFailure(
                "sampling_mismatch", f"receipt seed {claimed.seed} != requested {expected.seed}"
            )
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if not _close(getattr(claimed, name), getattr(expected, name)):
            failures.append(CheckFailure(
                "sampling_mismatch",
                f"receipt {name} {getattr(claimed, name)} != requested {getattr(expected, name)}"))
    if tuple(claimed.logit_bias) != tuple(expected.logit_bias):
        failures.append(CheckFailure("sampling_mismatch",
                                     "receipt logit_bias is not the requested one"))
    if list(claimed.stop) != list(expected.stop):
        failures.append(
            CheckFailure(
                "sampling_mismatch", f"receipt stop {claimed.stop} != requested {expected.stop}"
            )
        )
    return failures


def check_fingerprint(receipt: SignedReceipt, *, required: bool) -> list[CheckFailure]:
    """The fingerprint rows must be there (when ``required``), hash to what the body
    signs, and hold exactly one row per output token: a receipt the verifier could
    not hold against its own numbers is refused, not trusted."""
    body = receipt.body
    blob = receipt.fingerprint_bytes()
    if receipt.fingerprint is None and body.fingerprint_sha256 is None:
        if not required:
            return []
        return [CheckFailure("fingerprint_missing", "receipt carries no computation fingerprint")]
    if blob is None or body.fingerprint_sha256 is None:
        return [CheckFailure("fingerprint_missing",
                             "receipt fingerprint is not base64 or its hash is not signed")]
    failures = []
    if fp.digest(blob) != body.fingerprint_sha256:
        failures.append(CheckFailure("fingerprint_hash_mismatch",
                                     "fingerprint does not hash to fingerprint_sha256"))
    if len(blob) != fp.ROW_BYTES * body.completion_tokens:
        failures.append(CheckFailure(
            "fingerprint_length_mismatch",
            f"fingerprint of {len(blob)} bytes for {body.completion_tokens} tokens "
            f"({fp.ROW_BYTES} bytes each)"))
    return failures


def check_receipt(
    receipt: SignedReceipt,
    *,
    registered_model_sha256: str,
    request_sha256: str | None = None,
    relayed_text: str | None = None,
    relayed_token_ids: Sequence[int] | None = None,
    node_pubkey: str | None = None,
    job_id: str | None = None,
    model_id: str | None = None,
    usage: Any = None,
    finish_reason: str | None = None,
    expected_sampling: SamplingParams | None = None,
    context_length: int | None = None,
    expected_prompt_tokens: int | None = None,
    market_id: str | None = None,
    require_fingerprint: bool = False,
) -> list[CheckFailure]:
    """All cheap checks of one receipt; an empty list means it passed.

    Arguments left ``None`` are not checked (the signature, the token-id digest, the
    counts and ``registered_model_sha256`` always are). ``usage`` is the ``done``
    message's usage (an object or a mapping with ``prompt_tokens`` and
    ``completion_tokens``). ``context_length`` (the node's registered context) excuses
    a ``length`` finish short of ``max_tokens`` when prompt + output filled it.
    ``expected_prompt_tokens`` is the market's own count of the rendered prompt (plus a
    continuation prefix): a node's count moves money, so it must be exactly that.
    """
    body = receipt.body
    failures: list[CheckFailure] = []

    if not receipt.signature_valid():
        failures.append(
            CheckFailure("bad_signature", "receipt signature does not verify with its node_pubkey")
        )
    if node_pubkey is not None and body.node_pubkey != node_pubkey:
        failures.append(
            CheckFailure(
                "wrong_node", f"receipt signed by {body.node_pubkey}, job served by {node_pubkey}"
            )
        )
    if market_id is not None and body.market_id != market_id:
        failures.append(
            CheckFailure("wrong_market", f"receipt is for market {body.market_id!r}, "
                         f"this is {market_id!r}")
        )
    if expected_prompt_tokens is not None and body.prompt_tokens != expected_prompt_tokens:
        failures.append(
            CheckFailure("prompt_tokens_mismatch",
                         f"receipt prompt_tokens {body.prompt_tokens} != the market's count "
                         f"{expected_prompt_tokens}")
        )
    if job_id is not None and body.job_id != job_id:
        failures.append(
            CheckFailure("wrong_job", f"receipt is for job {body.job_id}, expected {job_id}")
        )
    if model_id is not None and body.model_id != model_id:
        failures.append(
            CheckFailure("wrong_model", f"receipt model {body.model_id!r}, job model {model_id!r}")
        )
    if body.model_sha256.lower() != registered_model_sha256.lower():
        failures.append(
            CheckFailure(
                "model_sha_mismatch",
                f"receipt model sha256 {body.model_sha256} != registered {registered_model_sha256}",
            )
        )
    if request_sha256 is not None and body.request_sha256 != request_sha256:
        failures.append(
            CheckFailure(
                "request_hash_mismatch",
                "receipt request_sha256 does not match the request the market sent",
            )
        )
    if relayed_text is not None and body.output_sha256 != sha256_hex(relayed_text):
        failures.append(
            CheckFailure(
                "output_hash_mismatch",
                "receipt output_sha256 does not match the text the market relayed",
            )
        )

    # Token ids: digest, count, and what was streamed.
    if token_ids_digest(receipt.output_token_ids) != body.output_token_ids_sha256:
        failures.append(
            CheckFailure(
                "token_ids_hash_mismatch", "output_token_ids do not hash to output_token_ids_sha256"
            )
        )
    if len(receipt.output_token_ids) != body.completion_tokens:
        failures.append(
            CheckFailure(
                "token_count_mismatch",
                f"{len(receipt.output_token_ids)} output token ids but completion_tokens="
                f"{body.completion_tokens}",
            )
        )
    if relayed_token_ids is not None and list(relayed_token_ids) != list(
        receipt.output_token_ids
    ):
        failures.append(
            CheckFailure(
                "token_ids_not_relayed",
                "receipt token ids differ from the token ids streamed in chunks",
            )
        )
    if usage is not None:
        get = usage.get if isinstance(usage, Mapping) else lambda k: getattr(usage, k, None)
        if get("completion_tokens") != body.completion_tokens:
            failures.append(
                CheckFailure(
                    "usage_mismatch",
                    f"usage completion_tokens {get('completion_tokens')} != receipt "
                    f"{body.completion_tokens}",
                )
            )
        if get("prompt_tokens") != body.prompt_tokens:
            failures.append(
                CheckFailure(
                    "usage_mismatch",
                    f"usage prompt_tokens {get('prompt_tokens')} != receipt {body.prompt_tokens}",
                )
            )
    if body.completion_tokens > body.sampling.max_tokens:
        failures.append(
            CheckFailure(
                "over_max_tokens",
                f"completion_tokens {body.completion_tokens} > max_tokens {body.sampling.max_tokens}",
            )
        )
    context_full = bool(
        context_length and body.prompt_tokens + body.completion_tokens >= context_length
    )
    if (
        finish_reason == "length"
        and body.completion_tokens < body.sampling.max_tokens
        and not context_full
    ):
        failures.append(
            CheckFailure(
                "truncated",
                f"finish_reason 'length' after {body.completion_tokens} of "
                f"{body.sampling.max_tokens} tokens",
            )
        )
    if body.finished_at < body.started_at:
        failures.append(CheckFailure("bad_times", "finished_at is before started_at"))
    if expected_sampling is not None:
        failures.extend(check_sampling(body.sampling, expected_sampling))
    failures.extend(check_fingerprint(receipt, required=require_fingerprint))
    return failures
