"""The computation fingerprint: a node's commitment to the distributions it sampled from.

At every output position a node records the ``K`` most likely tokens of its model's
distribution (temperature 1, before any sampling) with their log-probabilities, and
commits to them as one polynomial over the prime field GF(65521): the unique
polynomial of degree < K through the points ``(token id, q)``, where ``q`` is the
negated log-probability in 1/64-nat steps. Its K coefficients, 2 bytes each, are the
position's row: 8 bytes per token, 256 bytes per 32 tokens. The receipt signs the
hash of all rows; the rows travel beside it.

Why a polynomial: a verifier that recomputes the distribution in its one prefill knows
its own top tokens, and evaluating the node's polynomial at those ids yields the
node's value for each of them — or, for an id the node did not commit to, a value
that is uniformly random in the field and matches nothing. So the row is as small as
the values alone, yet it proves *which* tokens the node ranked first and how likely
it found them, to 1/64 nat. Another model, another quantisation, an altered prompt
or skipped layers move these numbers far more than honest numeric noise between
engines does (``compare``); copying them from an honest run of the real model would
mean running it.

Pure Python: the market and verifiers evaluate rows without numpy.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

K = 4  # tokens committed per position
PRIME = 65521  # the largest prime below 2**16: a coefficient is two bytes
STEPS_PER_NAT = 64  # log-probability quantum: 1/64 nat
ROW_BYTES = 2 * K
_DOMAIN = b"aidp-fingerprint-v1"


def quantise(logprob: float) -> int:
    """A log-probability (≤ 0) as a field element: −logprob in 1/64-nat steps."""
    if not math.isfinite(logprob):
        return PRIME - 1
    return min(PRIME - 1, max(0, round(-logprob * STEPS_PER_NAT)))


def _poly_mul_linear(poly: list[int], root: int) -> list[int]:
    """``poly · (x − root)`` over GF(PRIME); coefficients lowest degree first."""
    out = [0] * (len(poly) + 1)
    for i, c in enumerate(poly):
        out[i + 1] = (out[i + 1] + c) % PRIME
        out[i] = (out[i] - c * root) % PRIME
    return out


def interpolate(points: Sequence[tuple[int, int]]) -> list[int]:
    """The K coefficients of the polynomial through ``points`` (distinct x, fewer than K
    points allowed: the higher coefficients are then 0)."""
    coeffs = [0] * K
    for j, (xj, yj) in enumerate(points):
        basis = [1]
        denom = 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                basis = _poly_mul_linear(basis, xm)
                denom = denom * (xj - xm) % PRIME
        scale = yj * pow(denom, PRIME - 2, PRIME) % PRIME
        for i, c in enumerate(basis):
            coeffs[i] = (coeffs[i] + c * scale) % PRIME
    return coeffs


def evaluate(coeffs: Sequence[int], x: int) -> int:
    """The row's polynomial at ``x`` (Horner)."""
    value = 0
    for c in reversed(coeffs):
        value = (value * x + c) % PRIME
    return value


def encode_row(top: Iterable[tuple[int, float]]) -> bytes:
    """One position's row from its most likely (token id, logprob) pairs, best first.

    Only the first K are used; ids are reduced modulo the prime (vocabularies above
    65521 tokens), and an id colliding with an earlier one there is left out, so the
    row stays well defined for every vocabulary."""
    points: list[tuple[int, int]] = []
    seen: set[int] = set()
    for token, logprob in top:
        if len(points) == K:
            break
        x = int(token) % PRIME
        if x in seen:
            continue
        seen.add(x)
        points.append((x, quantise(float(logprob))))
    return b"".join(c.to_bytes(2, "little") for c in interpolate(points))


def rows(blob: bytes) -> list[list[int]]:
    """The coefficient rows of a fingerprint (raises ValueError if malformed)."""
    if len(blob) % ROW_BYTES:
        raise ValueError(f"fingerprint of {len(blob)} bytes is not whole rows of {ROW_BYTES}")
    out = []
    for start in range(0, len(blob), ROW_BYTES):
        row = [int.from_bytes(blob[start + 2 * i: start + 2 * i + 2], "little") for i in range(K)]
        if any(c >= PRIME for c in row):
            raise ValueError("fingerprint coefficient outside the field")
        out.append(row)
    return out


def digest(blob: bytes) -> str:
    """What the receipt signs: hex sha256 of the scheme's domain and the rows."""
    return hashlib.sha256(_DOMAIN + blob).hexdigest()


@dataclass(frozen=True)
class Comparison:
    """How a node's fingerprint sits against the verifier's own distributions.

    ``incomplete``: positions where fewer than K of the node's committed tokens were
    found among the verifier's likely tokens at about the node's values;
    ``deviations``: |node − verifier| log-probability, in nats, of every token found."""

    positions: int
    incomplete: int
    deviations: tuple[float, ...]

    @property
    def incomplete_fraction(self) -> float:
        return self.incomplete / self.positions if self.positions else 0.0

    @property
    def mean_deviation(self) -> float:
        return statistics.fmean(self.deviations) if self.deviations else 0.0

    @property
    def max_deviation(self) -> float:
        return max(self.deviations, default=0.0)


def compare_row(coeffs: Sequence[int], verifier_top: Sequence[tuple[int, float]],
                *, margin: float, window: float) -> tuple[int, list[float]]:
    """(tokens found, their deviations) for one position.

    The node's K tokens must be among the verifier's tokens no more than ``margin``
    nats below the verifier's K-th (numeric noise can reorder near-ties); a candidate
    counts as found when the node's value for it is within ``window`` nats of the
    verifier's. For an id the node did not commit to, the polynomial gives a uniform
    field element, which falls in the window with probability ≈ 2·window·64/65521."""
    if not verifier_top:
        return 0, []
    kth = verifier_top[min(K, len(verifier_top)) - 1][1]
    limit = kth - margin
    steps = window * STEPS_PER_NAT
    found: list[float] = []
    for token, logprob in verifier_top:
        if logprob < limit:
            break  # best first: the rest are further down
        claimed = evaluate(coeffs, int(token) % PRIME)
        gap = abs(claimed - quantise(logprob))
        if gap <= steps:
            found.append(gap / STEPS_PER_NAT)
    found.sort()
    return min(len(found), K), found[:K]


def compare(blob: bytes, verifier_tops: Sequence[Sequence[tuple[int, float]]], *,
            margin: float, window: float) -> Comparison:
    """Compare every row of ``blob`` with the verifier's top tokens at that position
    (temperature-1 log-probabilities, best first). Raises ValueError when the row count
    is not the number of positions."""
    table = rows(blob)
    if len(table) != len(verifier_tops):
        raise ValueError(f"{len(table)} fingerprint rows for {len(verifier_tops)} positions")
    incomplete = 0
    deviations: list[float] = []
    for coeffs, top in zip(table, verifier_tops, strict=True):
        found, devs = compare_row(coeffs, top, margin=margin, window=window)
        incomplete += found < min(K, len(top))
        deviations.extend(devs)
    return Comparison(positions=len(table), incomplete=incomplete, deviations=tuple(deviations))
