"""The protocol's sampler: every node samples with it, so a verifier can check each token.

Sampling at temperature T > 0 is Gumbel-max over the tempered, top-p-truncated logits:

    token = argmax over v in nucleus(top_p) of  logits[v] / T + g[v]

where ``g[v] = -log(-log(u[v]))`` and ``u`` is a keyed pseudo-random function of
(seed, output position, token): Philox4x64-10 (numpy's ``Philox``) keyed by the first 16
bytes of ``sha256(b"aidp-sampler-v1" || seed as 8 little-endian bytes)``, counter
``[0, position, 0, 0]`` (the position in the high word, so the streams of two positions
never overlap), ``u[v] = (raw[v] >> 11) / 2**53`` for the first ``vocab_size`` raw
outputs (numpy's ``Generator.random``; u = 0 gives g = −inf: never picked). The
nucleus is the smallest set of most likely tokens whose tempered probability reaches
``top_p`` (ties broken by id). Temperature 0 is argmax.

Gumbel-max draws exactly from softmax(logits / T) restricted to the nucleus, so sampling
stays statistically what the buyer asked for; but given the seed the token at each
position is a *function* of the distribution, so a verifier that recomputes the
distribution knows which token an honest node had to emit, up to numeric noise
(:func:`sampler_excess`). The seed is part of the signed request (the market sets one
when the buyer did not), and the noise differs at every position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from inference.base import GenerationRequest

SAMPLER = "gumbel-philox-v1"
_DOMAIN = b"aidp-sampler-v1"


def sampler_key(seed: int | None) -> np.ndarray:
    """The Philox key for a request's seed (None reads as 0; negative seeds wrap)."""
    value = (seed or 0) % 2**64
    digest = hashlib.sha256(_DOMAIN + value.to_bytes(8, "little")).digest()
    return np.frombuffer(digest[:16], dtype="<u8").astype(np.uint64)


def gumbel_noise(key: np.ndarray, position: int, vocab_size: int) -> np.ndarray:
    """g[v] for every token id v < vocab_size at one output position."""
    counter = np.array([0, position, 0, 0], dtype=np.uint64)
    u = np.random.Generator(np.random.Philox(key=key, counter=counter)).random(vocab_size)
    with np.errstate(divide="ignore"):
        return -np.log(-np.log(u))


def _ranked_prefix(tempered: np.ndarray, top_p: float, margin: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The head of the ranking (ids by falling tempered log-probability, ties by id) long
    enough to reach ``top_p`` of the mass and then ``margin`` nats below the token that
    reaches it: a partial sort instead of sorting the whole vocabulary every token."""
    size = tempered.shape[-1]
    k = 256
    while k < size:
        head = np.argpartition(-tempered, k)[:k]
        head = head[np.lexsort((head, -tempered[head]))]
        ranked = tempered[head]
        cumulative = np.cumsum(np.exp(ranked))
        reached = int(np.searchsorted(cumulative, top_p))
        # use only what the partition settled: the nucleus ends before the last element,
        # and everything within ``margin`` of its edge is inside too
        if reached < k - 1 and ranked[-1] < ranked[reached] - margin:
            return head, ranked
        k *= 4
    order = np.argsort(-tempered, kind="stable")
    return order, tempered[order]


def tempered_logprobs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(logits / T), in float64."""
    x = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        x = (x - x.max()) / temperature
    return x - np.log(np.exp(x).sum())


def nucleus(tempered: np.ndarray, top_p: float) -> np.ndarray:
    """Ids of the smallest most-likely set whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return np.arange(tempered.shape[-1])
    order, ranked = _ranked_prefix(tempered, top_p)
    cumulative = np.cumsum(np.exp(ranked))
    cutoff = int(np.searchsorted(cumulative, top_p)) + 1
    return order[:cutoff]


def sample(logits: np.ndarray, temperature: float, top_p: float, key: np.ndarray,
           position: int) -> int:
    """The token the protocol sampler emits at ``position`` for these logits."""
    if temperature == 0.0:
        return int(np.argmax(logits))
    noise = gumbel_noise(key, position, logits.shape[-1])
    if top_p >= 1.0:  # no normalising needed for an argmax over the whole vocabulary
        with np.errstate(over="ignore"):
            scaled = (logits.astype(np.float64) - float(logits.max())) / temperature
        return int(np.argmax(scaled + noise))
    tempered = tempered_logprobs(logits, temperature)
    keep = nucleus(tempered, top_p)
    return int(keep[np.argmax(tempered[keep] + noise[keep])])


def sure_nucleus(tempered: np.ndarray, top_p: float, temperature: float,
                 noise_nats: float) -> np.ndarray:
    """The tokens that are in the nucleus of *any* distribution whose log-probabilities
    differ from these by at most ``noise_nats`` (an honest node's numbers).

    With tempered noise ``w = 2·noise/T`` a token u can rank above v on the node only if
    ``t[u] > t[v] − 2w``, and the node's probabilities are within a factor ``e^w`` of
    these; v is surely kept when even that bound on the mass ranked above it stays under
    ``top_p``. A prefix of the ranking; shrinks as T falls."""
    if top_p >= 1.0:
        return np.arange(tempered.shape[-1])
    w = 2.0 * noise_nats / temperature
    order, ranked = _ranked_prefix(tempered, top_p, margin=2.0 * w)
    probs = np.exp(ranked)
    cumulative = np.cumsum(probs)
    reach = np.searchsorted(-ranked, -(ranked - 2.0 * w), side="left")  # ranked > t − 2w
    reach = np.maximum(reach, np.arange(1, ranked.shape[-1] + 1))  # ... and v itself
    above = cumulative[reach - 1] - probs
    kept = int(np.count_nonzero(np.exp(w) * above < top_p))
    return order[:kept]  # may be empty: then not even the top token is sure


def sampler_excess(logprobs: np.ndarray, token: int, temperature: float, top_p: float,
                   key: np.ndarray, position: int, nucleus_noise: float = 0.0,
                   same_choice: Sequence[int] = ()) -> float:
    """How far ``token`` falls short of the protocol sampler's choice, in nats.

    ``max over v != token in the sure nucleus of (lp[v] + T·g[v]) − (lp[token] +
    T·g[token])`` on the verifier's log-probabilities ``lp``: ≤ 0 when ``token`` is what
    the sampler picks from these numbers; an honest node's token exceeds 0 only by the
    numeric difference between its logits and the verifier's. Only tokens surely in the
    node's nucleus too are compared (:func:`sure_nucleus` with ``nucleus_noise`` nats),
    since that noise can move the nucleus boundary. In nats so that one tolerance
    serves every temperature (T → 0 is the greedy argmax gap).
    ``same_choice``: ids that count as the same choice as ``token`` (every end-of-
    generation id, for a claimed stop): the best of them is compared with the rest.
    """
    group = np.unique(np.array([token, *same_choice], dtype=np.int64))
    if temperature <= 0.0:
        rest = np.delete(logprobs, group)
        return float(rest.max() - logprobs[group].max()) if rest.size else float("-inf")
    tempered = tempered_logprobs(logprobs, temperature)
    keep = sure_nucleus(tempered, top_p, temperature, nucleus_noise)
    noise = gumbel_noise(key, position, logprobs.shape[-1])
    score = logprobs.astype(np.float64) + temperature * noise
    others = keep[~np.isin(keep, group)]
    if others.size == 0:
        return float("-inf")
    return float(score[others].max() - score[group].max())


def sampler_excesses(request: GenerationRequest, output_ids: list[int],
                     row: Callable[[int], np.ndarray], nucleus_noise: float,
                     eog_ids: Sequence[int] = ()) -> list[float | None]:
    """``sampler_excess`` at every output position of a sampled request (``row(i)``: the
    verifier's log-probabilities there); an end-of-generation id (a scored stop) counts
    as every end-of-generation id. None everywhere for greedy requests, whose argmax gap
    the top-k already shows."""
    if request.temperature <= 0.0:
        return [None] * len(output_ids)
    key = sampler_key(request.seed)
    start = len(request.continuation_token_ids)  # positions count the whole output
    eog = set(eog_ids)
    return [
        sampler_excess(row(i), token, request.temperature, request.top_p, key, start + i,
                       nucleus_noise, sorted(eog) if token in eog else ())
        for i, token in enumerate(output_ids)
    ]
