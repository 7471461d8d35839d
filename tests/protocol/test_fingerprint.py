"""The computation fingerprint: rows commit to a position's top tokens and values."""

from __future__ import annotations

import random

import pytest

from protocol import fingerprint as fp

TOP = [(17, -0.05), (4093, -3.2), (88, -4.0), (12001, -6.75)]


def test_a_row_gives_back_each_committed_value_and_is_eight_bytes() -> None:
    row = fp.encode_row(TOP)
    assert len(row) == fp.ROW_BYTES == 8
    (coeffs,) = fp.rows(row)
    for token, logprob in TOP:
        assert fp.evaluate(coeffs, token) == fp.quantise(logprob)


def test_only_the_first_k_are_committed() -> None:
    longer = [*TOP, (5, -7.0), (6, -7.5)]
    assert fp.encode_row(longer) == fp.encode_row(TOP)


def test_an_uncommitted_id_reads_as_noise() -> None:
    (coeffs,) = fp.rows(fp.encode_row(TOP))
    values = {fp.evaluate(coeffs, t) for t in range(20_000, 20_200)}
    assert len(values) > 190  # no structure to exploit: nearly all distinct
    close = [v for v in values if v < 20 * fp.STEPS_PER_NAT]
    assert len(close) < 10  # an honest-looking log-probability is rare


def test_vocabularies_above_the_prime_stay_well_defined() -> None:
    colliding = [(3, -0.1), (3 + fp.PRIME, -2.0), (9, -3.0)]
    (coeffs,) = fp.rows(fp.encode_row(colliding))
    assert fp.evaluate(coeffs, 3) == fp.quantise(-0.1)  # the first of the two is kept
    assert fp.evaluate(coeffs, 9) == fp.quantise(-3.0)


def _noisy(top: list[tuple[int, float]], rng: random.Random, scale: float
           ) -> list[tuple[int, float]]:
    return sorted(((t, min(0.0, lp + rng.uniform(-scale, scale))) for t, lp in top),
                  key=lambda e: -e[1])


def _verifier_top(rng: random.Random) -> list[tuple[int, float]]:
    ids = rng.sample(range(49_152), 12)
    lps = sorted((-rng.uniform(0, 12) for _ in ids), reverse=True)
    lps[0] = -0.02
    return list(zip(ids, lps, strict=True))


def test_honest_noise_compares_close_and_another_distribution_does_not() -> None:
    rng = random.Random(1)
    verifier = [_verifier_top(rng) for _ in range(64)]
    honest = b"".join(fp.encode_row(_noisy(top, rng, 0.05)) for top in verifier)
    result = fp.compare(honest, verifier, margin=1.0, window=1.5)
    assert result.positions == 64
    assert result.mean_deviation < 0.06 and result.incomplete_fraction < 0.1

    other = b"".join(fp.encode_row(_verifier_top(rng)) for _ in verifier)  # other tokens
    far = fp.compare(other, verifier, margin=1.0, window=1.5)
    assert far.incomplete_fraction > 0.9

    shifted = b"".join(fp.encode_row([(t, lp - 1.0) for t, lp in top]) for top in verifier)
    moved = fp.compare(shifted, verifier, margin=1.0, window=1.5)
    assert moved.incomplete_fraction < 0.1 and moved.mean_deviation > 0.9


def test_malformed_fingerprints_are_refused() -> None:
    with pytest.raises(ValueError, match="whole rows"):
        fp.rows(b"\x00" * 7)
    with pytest.raises(ValueError, match="outside the field"):
        fp.rows(b"\xff\xff" * fp.K)
    with pytest.raises(ValueError, match="rows for"):
        fp.compare(fp.encode_row(TOP), [TOP, TOP], margin=1.0, window=1.5)


def test_the_digest_covers_every_byte() -> None:
    blob = fp.encode_row(TOP) * 3
    assert fp.digest(blob) != fp.digest(blob[:-1] + bytes([blob[-1] ^ 1]))
