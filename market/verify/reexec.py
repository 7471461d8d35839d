"""Verification by re-execution: ask a verifier engine for its scores over the node's
claimed output, then judge them (``market.verify.judge``).

The verifier runs ONE prefill over prompt + the node's claimed output
(``Engine.score``), getting, at every output position, the claimed token's
log-probability and the verifier's top-k. Before judging, the cheap facts are checked
here: a ``length`` finish with fewer tokens than ``max_tokens`` is truncation, and an
output text that is not what its token ids decode to was edited after generation.
"""


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from inference.base import Engine, GenerationRequest
from inference.sampler import SAMPLER
from market.settings import Tolerances
from market.verify.judge import FinishReason, Verdict, judge
from protocol.job import JobRequest
from protocol.receipt import SignedReceipt
from protocol.text import TextStream


class VerificationUnavailable(Exception):
    """The verifier cannot judge this receipt (other model, unknown prefix…): never slash."""


# ---- the driver ------------------------------------------------------------------------------


def text_matches_tokens(
    engine: Engine,
    output_text: str,
    claimed: Sequence[int],
    prefix_ids: Sequence[int],
    stop: Sequence[str],
) -> tuple[bool | None, bool]:
    """Is ``output_text`` exactly what ``claimed`` decodes to (after ``prefix_ids``)?

    Returns (matches — None when the engine cannot decode, stop_string_seen). With the
    engine's pieces this is the protocol's own rule (:class:`protocol.text.TextStream`
    replayed over the continuation, then the claimed ids; a segment cut short by a
    cancel may lack the held tail). Ids after the stop string that ended the text do not
    match.
    """
    piece = engine.token_piece()
    if piece is not None:
        # ids from a node: outside the vocabulary is invalid_token
        engine.check_token_ids(list(prefix_ids) + list(claimed), "token_ids")
        stream = TextStream(stop)
        stream.prime(piece(t) for t in prefix_ids)
        parts: list[str] = []
        stopped = False
        for position, token in enumerate(claimed):
            delta, stopped = stream.push(piece(token))
            parts.append(delta)
            if stopped:
                if position != len(claimed) - 1:
                    return False, True
                break
        released = "".join(parts)
        if stopped:
            return output_text == released, True
        return output_text in (released + stream.flush(), released), False
    return _text_matches_decoded(engine, output_text, claimed, prefix_ids, stop)


def _text_matches_decoded(
    engine: Engine,
    output_text: str,
    claimed: Sequence[int],
    prefix_ids: Sequence[int],
    stop: Sequence[str],
) -> tuple[bool | None, bool]:
    """The same question for an engine that can only decode whole sequences."""
    full = engine.decode(list(prefix_ids) + list(claimed))
    if full is None:
        return None, False
    if prefix_ids:
        # The prefix may end inside a multi-byte character: compare after it.
        pre = (engine.decode(list(prefix_ids)) or "").rstrip("\ufffd")
        if not full.startswith(pre):
            return False, False
        generated = full[len(pre) :]
        candidates = [generated[i:] for i in range(min(2, len(generated)) + 1)]
    else:
        candidates = [full]
    for text in candidates:
        if text == output_text:
            return True, False
        if stop and text.startswith(output_text):
            rest = text[len(output_text) :]
            if any(rest.startswith(s) for s in stop if s):
                return True, True
    return False, False


def find_continuation(
    receipt: SignedReceipt,
    request: JobRequest,
    candidates: Sequence[Sequence[int]],
) -> list[int] | None:
    """The continuation prefix whose request digest the receipt attests, among candidates."""
    for cand in candidates:
        if request.digest(cand) == receipt.body.request_sha256:
            return list(cand)
    return None


async def reexecute(
    engine: Engine,
    receipt: SignedReceipt,
    request: GenerationRequest,
    *,
    output_text: str | None = None,
    finish_reason: FinishReason | None = None,
    context_length: int | None = None,
    tolerances: Tolerances | None = None,
    sampler: str | None = SAMPLER,
) -> Verdict:
    """Re-execute one receipt on ``engine`` and judge it.

    ``context_length`` is the node's registered context size (a generation that fills
    it ends short of ``max_tokens`` honestly). ``sampler``: the sampler the job's node
    had to use; only the protocol's (``inference.sampler.SAMPLER``) is checked token by
    token (a job from before it is judged by the statistical checks alone).

    ``request`` is the generation request the node was given (with its continuation
    prefix). Raises :class:`VerificationUnavailable` when the verifier runs another
    model than the receipt attests.
    """
    from market.verify.engine import eog_token_ids, vocab_size

    tol = tolerances or Tolerances()
    body = receipt.body
    cross_engine = body.engine != engine.name
    if cross_engine:  # two implementations of one model differ by more than one does
        tol = tol.model_copy(update={"fingerprint_mean_tol":
                                     tol.fingerprint_mean_tol_cross_engine})
    if engine.model.sha256.lower() != body.model_sha256.lower():
        raise VerificationUnavailable(
            f"verifier has model sha {engine.model.sha256[:12]}…, receipt {body.model_sha256[:12]}…"
        )
    claimed = list(receipt.output_token_ids)
    sampling = body.sampling
    if finish_reason is None:
        finish_reason = "length" if len(claimed) >= sampling.max_tokens else "stop"

    edited = False
    stop_string_seen = False
    if output_text is not None:
        matches, stop_string_seen = text_matches_tokens(
            engine, output_text, claimed, request.continuation_token_ids, sampling.stop
        )
        edited = matches is False

    eog_ids = eog_token_ids(engine)
    # prompt + output filled the node's context: generation had to end there (honest)
    context_exhausted = bool(
        context_length and body.prompt_tokens + len(claimed) >= context_length)
    # A stop the text shows was a stop string needs no end-of-generation mass; without
    # the text, a stop under stop strings cannot be told apart, so it is not judged.
    natural_stop = (
        finish_reason == "stop"
        and len(claimed) < sampling.max_tokens
        and not stop_string_seen
        and not context_exhausted
        and (output_text is not None or not sampling.stop)
    )
    scored_ids = claimed + [eog_ids[0]] if natural_stop and eog_ids else claimed
    scores = await engine.score(request, scored_ids, top_k=tol.top_k,
                                nucleus_noise=tol.sampler_nucleus_noise)
    if sampler != SAMPLER:
        scores = [replace(s, sampler_excess=None) for s in scores]
    eog_score = scores[len(claimed)] if len(scores) > len(claimed) else None
    verdict = judge(
        sampling,
        scores[: len(claimed)],
        claimed,
        finish_reason=finish_reason,
        stop_explained=stop_string_seen,
        eog_score=eog_score,
        eog_token_ids=eog_ids,
        context_exhausted=context_exhausted,
        tolerances=tol,
        vocab_size=vocab_size(engine),
        fingerprint=receipt.fingerprint_bytes(),
    )
    if edited:
        verdict.fraud = True
        verdict.reasons.insert(0, "edited: output text is not what the output token ids decode to")
        verdict.stats["text_mismatch"] = True
    verdict.stats["stop_string"] = stop_string_seen
    verdict.stats["verifier"] = {
        "engine": engine.name,
        "engine_version": engine.version,
        "model_sha256": engine.model.sha256,
    }
    verdict.stats["cross_engine"] = cross_engine
    return verdict
