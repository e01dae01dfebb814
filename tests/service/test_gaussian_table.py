"""The inversion sampler for small σ (`samplers.GaussianTable`): its bounds, its refinement path
and its law, each against an independent high-precision computation of the CDF."""

from __future__ import annotations

import decimal
import math
import random
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from service.domain import noise, samplers

from .test_noise_samplers import _chi_square, _gaussian_pmf

DRAWS = 100_000
_DIGITS = 80


def _cdf(variance: Fraction, reach: int) -> dict[int, decimal.Decimal]:
    """B(z) = P[Z ≤ z] for |z| ≤ reach, each weight by its own Decimal exp (80 digits), the
    normaliser summed far enough that what is left out is below 10^-80."""
    with decimal.localcontext() as context:
        context.prec = _DIGITS
        context.Emin = -(10**9)
        half = decimal.Decimal(variance.denominator) / (2 * decimal.Decimal(variance.numerator))
        sigma = math.sqrt(float(variance))
        far = max(reach, math.ceil(20 * sigma) + 10)
        weight = {z: (-(z * z) * half).exp() for z in range(-far, far + 1)}
        total = sum(weight.values())
        out, running = {}, decimal.Decimal(0)
        for z in range(-far, far + 1):
            running += weight[z]
            if abs(z) <= reach:
                out[z] = running / total
        return out


class _Words:
    """A word source that answers fixed words first, then random ones (seeded, for replay)."""

    def __init__(self, first: list[int], seed: int = 0) -> None:
        self._queue = deque(first)
        self._random = random.Random(seed)
        self.used = 0

    def words(self, count: int) -> np.ndarray:
        out = []
        for _ in range(count):
            out.append(self._queue.popleft() if self._queue else self._random.getrandbits(64))
        self.used += count
        return np.array(out, dtype=np.uint64)


def _inverse(cdf: dict[int, decimal.Decimal], u: decimal.Decimal) -> int:
    """The z with B(z − 1) ≤ u < B(z)."""
    return min(z for z, b in cdf.items() if u < b)


@pytest.mark.parametrize("variance", [Fraction(1, 100), Fraction(9, 4), Fraction(1600)])
def test_every_table_bound_holds_the_true_boundary(variance: Fraction) -> None:
    table = samplers.GaussianTable(variance)
    n = (len(table._lo) - 2) // 2
    cdf = _cdf(variance, n + 1)
    scale = decimal.Decimal(2) ** 64
    with decimal.localcontext() as context:
        context.prec = _DIGITS
        for index in range(2 * n + 2):
            exact = cdf[index - n - 1] * scale
            assert int(table._lo[index]) <= exact
            assert exact <= int(table._up[index]) or int(table._up[index]) == 2**64 - 1
    # The bounds are tight: undecided words are a vanishing share of all words.
    widths = table._up.astype(object) - table._lo.astype(object)
    assert max(widths[1:-1]) <= 2**20


@pytest.mark.parametrize("variance", [Fraction(9, 4), Fraction(1600), Fraction(7, 1024)])
def test_draws_are_the_inverse_cdf_of_their_bits(variance: Fraction) -> None:
    """Words fed in are U's bits: the draw is the exact inverse CDF of U, including words that
    fall on a boundary (so that only a second or third word decides) and the far tails."""
    n = samplers._half_width(variance)
    cdf = _cdf(variance, 3 * n)
    table = samplers.GaussianTable(variance)
    with decimal.localcontext() as context:
        context.prec = _DIGITS
        cases: list[list[int]] = [[w] for w in (1, 2**63, 2**64 - 2)]
        cases += [[random.Random(k).getrandbits(64)] for k in range(200)]
        for z in range(-4, 5):  # U a hair below and above B(z), agreeing with it for 128 bits
            exact = int(cdf[z] * decimal.Decimal(2) ** 192)
            for bits in (exact - 1, exact + 1):
                if not 0 <= bits < 2**192:
                    continue  # B(z) within 2^-192 of 0 or 1 (a tiny σ): the tails cover it
                cases.append([bits >> 128, (bits >> 64) & (2**64 - 1), bits & (2**64 - 1)])
        cases += [[0, 0, 5], [0, 2**63], [2**64 - 1, 2**64 - 1, 7], [2**64 - 1, 2**62]]
        for words in cases:
            source = _Words(words + [0] * 8)
            draw = table.draw(source, 1)[0]  # type: ignore[arg-type]
            prefix = sum(w << (64 * (len(words) - 1 - i)) for i, w in enumerate(words))
            low = decimal.Decimal(prefix) / decimal.Decimal(2) ** (64 * len(words))
            high = decimal.Decimal(prefix + 1) / decimal.Decimal(2) ** (64 * len(words))
            expected = {_inverse(cdf, low), _inverse(cdf, high - decimal.Decimal(10) ** -70)}
            if len(expected) == 1:
                assert draw == expected.pop(), words
            else:  # the words given do not decide: the zeros that follow do
                assert draw in expected, words


@pytest.mark.parametrize(
    ("sigma", "word_bits"),
    [(Fraction(1, 3), 64), (Fraction(5, 2), 64), (Fraction(40), 64), (Fraction(3), 6)],
    ids=["sigma-1/3", "sigma-5/2", "sigma-40", "sigma-3-six-bit-words"],
)
def test_table_draws_match_the_pmf(sigma: Fraction, word_bits: int) -> None:
    """Six-bit first words leave about a third of the draws to the refinement path."""
    table = samplers.GaussianTable(sigma * sigma, word_bits=word_bits)
    samples = table.draw(samplers.Csprng(), DRAWS)
    assert _chi_square(samples, _gaussian_pmf(sigma, int(8 * sigma) + 2)) > 1e-4
    # ... and the check can fail: a σ 4 % off is rejected.
    assert _chi_square(samples, _gaussian_pmf(sigma * Fraction(26, 25), int(8 * sigma) + 2)) < 1e-4


def test_the_refinement_path_keeps_the_law() -> None:
    """Draws whose first word is undecided, alone: their law is the conditional one."""
    variance = Fraction(4)
    table = samplers.GaussianTable(variance, word_bits=4)
    rng = samplers.Csprng()
    undecided = [w for w in range(16) if not _decided(table, w)]
    assert undecided  # four-bit words: most boundaries leave one undecided
    cdf = _cdf(variance, 40)
    for word in undecided[:3]:
        draws = [table._refine(rng, word, 4) for _ in range(4000)]
        low, high = Fraction(word, 16), Fraction(word + 1, 16)
        conditional = {}
        for z in range(-40, 41):
            below = Fraction(cdf[z - 1]) if z > -40 else Fraction(0)
            overlap = min(high, Fraction(cdf[z])) - max(low, below)
            if overlap > 0:
                conditional[z] = float(overlap / (high - low))
        assert set(draws) <= set(conditional)
        observed = [draws.count(z) for z in sorted(conditional)]
        expected = [conditional[z] * len(draws) for z in sorted(conditional)]
        assert stats.chisquare(observed, expected).pvalue > 1e-4


def _decided(table: samplers.GaussianTable, word: int) -> bool:
    index = int(np.searchsorted(table._lo, np.uint64(word), side="right"))
    return 0 < index < table._lo.size and word >= int(table._up[index - 1])


def test_plans_of_small_sigma_draw_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A noisy-argmax-sized σ on a unit grid uses the table; a release's fine grid does not."""
    small = noise.NoisePlan("discrete_gaussian", 0, Fraction(1600), 1.5, 10)
    assert samplers.fits_table(small.parameter)
    release = noise.gaussian_plan(1.0, 10, sigma=3.0)
    assert not samplers.fits_table(release.parameter)
    assert samplers.fits_table(Fraction(1388**2)) and not samplers.fits_table(Fraction(1400**2))
    with pytest.raises(ValueError):
        samplers.gaussian_table(Fraction(1400**2))
    monkeypatch.setattr(samplers, "gaussian_array", None)  # the rejection sampler is not used
    draws = small.draw(samplers.Csprng(), 50_000)
    assert np.std(draws) == pytest.approx(40.0, rel=0.02)
