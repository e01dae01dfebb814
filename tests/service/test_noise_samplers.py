"""The exact samplers and the grid: against their exact pmfs, their sources, their bounds."""

from __future__ import annotations

import math
import os
import random
from collections import Counter, defaultdict
from fractions import Fraction
from itertools import count

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from service.domain import noise, samplers
from service.domain.errors import InvalidRequest

DRAWS = 100_000


def _chi_square(samples: list[int], pmf: dict[int, float]) -> float:
    """p-value of a chi-square goodness-of-fit test of `samples` against a symmetric, unimodal
    `pmf` (the mass past its support split evenly between its two ends).

    Every bin expects at least 5 draws: the values expected that often form one run [lo, hi],
    and every value outside it, drawn or in the pmf, joins the end of the run on its side.
    (The tails once formed one bin of their own: for σ = 1/3 it expected 0.003 draws, so a
    single draw of ±2, which happens in 0.3 % of runs, read as p = 1e-72.)
    """
    n = len(samples)
    often = [value for value, probability in pmf.items() if probability * n >= 5]
    lo, hi = min(often), max(often)
    observed = Counter(min(max(value, lo), hi) for value in samples)
    expected: defaultdict[int, float] = defaultdict(float)
    for value, probability in pmf.items():
        expected[min(max(value, lo), hi)] += probability * n
    past = (1.0 - sum(pmf.values())) / 2 * n
    expected[lo] += past
    expected[hi] += past
    bins = range(lo, hi + 1)
    wanted = np.asarray([expected[b] for b in bins])
    result = stats.chisquare([observed[b] for b in bins], wanted * n / wanted.sum())
    return float(result.pvalue)


def _laplace_pmf(scale: Fraction, support: int) -> dict[int, float]:
    r = math.exp(-1.0 / float(scale))
    return {z: (1 - r) / (1 + r) * r ** abs(z) for z in range(-support, support + 1)}


def _gaussian_pmf(sigma: Fraction, support: int) -> dict[int, float]:
    s2 = float(sigma) ** 2
    weights = {z: math.exp(-(z * z) / (2 * s2)) for z in range(-support, support + 1)}
    total = sum(math.exp(-(z * z) / (2 * s2)) for z in range(-20 * support, 20 * support + 1))
    return {z: w / total for z, w in weights.items()}


def _laplace_draws(vectorised: bool, scale: Fraction) -> list[int]:
    rng = samplers.Csprng()
    if vectorised:
        return samplers.laplace_array(rng, DRAWS, scale)
    return [samplers.discrete_laplace(rng, scale) for _ in range(DRAWS)]


def _gaussian_draws(vectorised: bool, sigma: Fraction) -> list[int]:
    rng = samplers.Csprng()
    if vectorised:
        return samplers.gaussian_array(rng, DRAWS, sigma * sigma)
    return [samplers.discrete_gaussian(rng, sigma * sigma) for _ in range(DRAWS)]


@pytest.mark.parametrize("vectorised", [False, True], ids=["scalar", "vectorised"])
@pytest.mark.parametrize("scale", [Fraction(1, 2), Fraction(3), Fraction(7, 3)])
def test_discrete_laplace_matches_its_pmf(vectorised: bool, scale: Fraction) -> None:
    samples = _laplace_draws(vectorised, scale)
    assert _chi_square(samples, _laplace_pmf(scale, int(12 * scale) + 2)) > 1e-4


@pytest.mark.parametrize(
    ("vectorised", "sigma"),
    [
        (False, Fraction(1, 3)),
        (False, Fraction(5, 2)),
        (False, Fraction(1.7)),  # σ² with a 2^-104 denominator: big integers throughout
        (True, Fraction(1, 3)),
        (True, Fraction(5, 2)),
        (True, Fraction(17, 10)),
        (True, Fraction(1234, 7)),
    ],
)
def test_discrete_gaussian_matches_its_pmf(vectorised: bool, sigma: Fraction) -> None:
    samples = _gaussian_draws(vectorised, sigma)
    assert _chi_square(samples, _gaussian_pmf(sigma, int(8 * sigma) + 2)) > 1e-4


@pytest.mark.parametrize("vectorised", [False, True], ids=["scalar", "vectorised"])
def test_the_chi_square_check_can_fail(vectorised: bool) -> None:
    """The same check rejects draws of a slightly wrong scale (so the tests above can fail)."""
    samples = _gaussian_draws(vectorised, Fraction(27, 10))
    assert _chi_square(samples, _gaussian_pmf(Fraction(5, 2), 30)) < 1e-6
    laplace = _laplace_draws(vectorised, Fraction(16, 5))
    assert _chi_square(laplace, _laplace_pmf(Fraction(3), 40)) < 1e-6


def test_vectorised_limits_are_what_the_int64_arithmetic_needs() -> None:
    assert samplers.fits_laplace(Fraction(2**55, 3)) and not samplers.fits_laplace(Fraction(2**56))
    assert samplers.fits_gaussian(Fraction(10_000**2)) and not samplers.fits_gaussian(
        Fraction(20_000**2)
    )
    with pytest.raises(ValueError):
        samplers.gaussian_array(samplers.Csprng(), 3, Fraction(20_000**2))


def test_a_plan_beyond_the_vectorised_limits_draws_on_the_scalar_path() -> None:
    """100,000 values under a huge σ in grid units: exact Python integers, right spread."""
    plan = noise.gaussian_plan(1.0, 10**6, sigma=5.0)
    assert not samplers.fits_gaussian(plan.parameter)
    draws = plan.draw(samplers.Csprng(), 20_000)
    spread = math.sqrt(sum(z * z for z in draws) / len(draws))
    assert spread == pytest.approx(math.sqrt(plan.parameter), rel=0.03)


@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(3, 10), Fraction(1), Fraction(27, 10)])
def test_bernoulli_exp_has_probability_exp_minus_gamma(gamma: Fraction) -> None:
    rng = samplers.Csprng()
    hits = sum(
        samplers.bernoulli_exp(rng, gamma.numerator, gamma.denominator) for _ in range(DRAWS)
    )
    assert stats.binomtest(hits, DRAWS, math.exp(-float(gamma))).pvalue > 1e-4


def test_below_is_uniform_and_exact_at_the_edges() -> None:
    rng = samplers.Csprng()
    assert {rng.below(1) for _ in range(100)} == {0}
    draws = [rng.below(10) for _ in range(DRAWS)]
    assert set(draws) == set(range(10))
    assert stats.chisquare(np.bincount(draws, minlength=10)).pvalue > 1e-4
    big = 3 * 2**200 + 1
    assert all(0 <= rng.below(big) < big for _ in range(1000))
    with pytest.raises(ValueError):
        rng.below(0)


def test_samplers_draw_from_os_urandom_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """With os.urandom replaced by a fixed byte stream the draws repeat exactly: nothing else
    (no PRNG, no clock) feeds them; and every other source we know of is disabled."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a sampler used a source other than os.urandom")

    for name in ("random", "getrandbits", "randrange", "randint", "uniform", "gauss"):
        monkeypatch.setattr(random, name, forbidden)
    monkeypatch.setattr(np.random, "default_rng", forbidden)
    monkeypatch.setattr(np.random, "random", forbidden)

    def draws() -> tuple[list[float], int]:
        stream = random.Random(7)  # a private instance: the patched module functions stay off
        requested = count()

        def fixed(size: int) -> bytes:
            for _ in range(size):
                next(requested)
            return stream.randbytes(size)

        monkeypatch.setattr(os, "urandom", fixed)
        laplace, _ = noise.laplace_plan(1.0, 50, epsilon=Fraction(1, 2))
        gaussian = noise.gaussian_plan(1.0, 50, sigma=3.0)
        values = [float(v) for v in range(50)]
        return laplace.noised(values) + gaussian.noised(values), next(requested)

    first, used = draws()
    second, _ = draws()
    assert first == second and used > 0


def test_laplace_plan_is_exactly_the_declared_epsilon() -> None:
    plan, epsilon = noise.laplace_plan(2.0, 3, epsilon=Fraction(1, 10))
    assert epsilon == Fraction(1, 10)
    grid = Fraction(2) ** plan.grid_exponent
    # The grid is 2^12 times finer than both the scale (20) and the per-value sensitivity (2/3).
    assert grid <= Fraction(2, 3) / 2**12 < 2 * grid
    units = math.floor(Fraction(2) / grid + Fraction(9, 2))  # Δ/g + 3/2 per value
    assert plan.parameter == units * 10  # scale t with D/t = ε exactly
    assert plan.sensitivity == float(units * grid) >= 2.0
    assert plan.noise_scale >= 20.0 and plan.noise_scale / 20.0 - 1 < 2**-12 * 4.5


def test_laplace_plan_with_a_scale_charges_the_rounded_sensitivity() -> None:
    plan, epsilon = noise.laplace_plan(1.0, 4, scale=8.0)
    grid = Fraction(2) ** plan.grid_exponent
    assert plan.parameter * grid == 8
    assert epsilon == math.floor(1 / grid + 6) / plan.parameter > Fraction(1, 8)


def test_gaussian_plan_calibrates_at_the_rounded_sensitivity() -> None:
    plan = noise.gaussian_plan(1.0, 100, epsilon=1.0, delta=1e-5)
    assert plan.grid <= (1.0 / math.sqrt(100)) * 2**-12
    assert plan.sensitivity >= 1.0 + plan.grid * 15  # Δ + 1.5·g·√d
    # Balle & Wang's σ for (1, 1e-5) is 3.7306 at sensitivity 1; here at Δ_rounded.
    assert plan.noise_scale == pytest.approx(3.7306 * plan.sensitivity, rel=1e-4)
    assert plan.noise_scale >= 3.7306


def test_values_beyond_the_grid_are_refused() -> None:
    plan, _ = noise.laplace_plan(1.0, 1, epsilon=Fraction(1))
    limit = plan.largest_input
    assert limit == 2.0**52 * plan.grid
    assert len(plan.noised([limit])) == 1
    with pytest.raises(InvalidRequest, match="beyond what the noise grid carries"):
        plan.noised([math.nextafter(limit, math.inf)])
    with pytest.raises(InvalidRequest):
        plan.noised([1e17])


def test_outputs_lie_on_the_grid() -> None:
    plan = noise.gaussian_plan(1.0, 1000, sigma=0.7)
    out = plan.noised([random.Random(1).uniform(-5, 5) for _ in range(1000)])
    assert all(math.ldexp(y, -plan.grid_exponent).is_integer() for y in out)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8),
    st.floats(0.01, 100.0),
    st.floats(0.0, 1.0),
    st.integers(1, 8),
)
def test_the_charged_l1_bound_holds_for_parsed_neighbours(
    xs: list[float], delta: float, fraction: float, size_scale: int
) -> None:
    """Two neighbouring real vectors v, v′ (‖v − v′‖₁ ≤ Δ), each parsed to doubles as a JSON body
    would be and rounded to a plan's grid, move by at most the plan's L1 bound in grid steps."""
    size = len(xs)
    plan, _ = noise.laplace_plan(delta, size, scale=delta * size_scale / 1000)
    grid = Fraction(2) ** plan.grid_exponent
    limit = Fraction(plan.largest_input) / 2
    real = [max(-limit, min(limit, Fraction(x) + Fraction(1, 3) * grid)) for x in xs]
    neighbour = [v + Fraction(delta) * Fraction(fraction) / size for v in real]
    moved = sum(
        abs(
            noise.to_grid(float(a), plan.grid_exponent)
            - noise.to_grid(float(b), plan.grid_exponent)
        )
        for a, b in zip(real, neighbour, strict=True)
    )
    units = round(Fraction(plan.sensitivity) / grid)
    assert units == math.floor(Fraction(delta) / grid + Fraction(3 * size, 2))
    assert moved <= units
    assert [noise.to_grid(x, plan.grid_exponent) for x in xs] == [
        round(Fraction(x) / grid) for x in xs
    ]  # exact, ties to even
