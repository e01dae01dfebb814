"""The laws every RDP curve and the ε conversion obey, checked on random inputs.

Tolerances. Integer orders are computed to rounding (1e-12 relative is ample). Fractional
orders are upper bounds within 2e-12 absolute in log A_α per step (see
`accountant.rdp._log_a_fractional`), so a law comparing two of them may be off by that
much; where that slack is used it is written out, never a blanket tolerance.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from accountant import DEFAULT_ORDERS, rdp
from tests.accountant.accountant_reference import balle_epsilon

PROPERTY = settings(max_examples=40, deadline=None)

ORDERS = np.sort(DEFAULT_ORDERS)
SERIES_SLACK = 2e-12  # per step, absolute in log A_α


def log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: float(10.0**e))


sample_rates = st.one_of(log_uniform(1e-5, 1.0), st.just(1.0))
noise_multipliers = log_uniform(0.3, 100.0)
step_counts = st.integers(1, 10**6)
deltas = log_uniform(1e-12, 0.5)


def slack(steps: int, orders: np.ndarray = ORDERS) -> np.ndarray:
    """How far above the truth a fractional order may sit: steps·2e-12/(α-1); 0 for integers."""
    return np.where(orders == np.floor(orders), 0.0, steps * SERIES_SLACK / (orders - 1))


@PROPERTY
@given(q=sample_rates, sigma=noise_multipliers, steps=step_counts)
def test_curve_is_non_decreasing_in_the_order(q: float, sigma: float, steps: int) -> None:
    """Rényi divergence is non-decreasing in α (van Erven & Harremoës 2014, Thm. 3)."""
    curve = rdp.subsampled_gaussian(q, sigma, steps, ORDERS)
    lower, upper = curve[:-1], curve[1:]
    assert np.all(lower <= upper * (1 + 1e-12) + slack(steps)[:-1])


@PROPERTY
@given(q=sample_rates, sigmas=st.tuples(noise_multipliers, noise_multipliers), steps=step_counts)
def test_curve_is_non_increasing_in_sigma(
    q: float, sigmas: tuple[float, float], steps: int
) -> None:
    small, large = sorted(sigmas)
    noisier = rdp.subsampled_gaussian(q, large, steps, ORDERS)
    assert np.all(
        noisier <= rdp.subsampled_gaussian(q, small, steps, ORDERS) * (1 + 1e-12) + slack(steps)
    )


@PROPERTY
@given(qs=st.tuples(sample_rates, sample_rates), sigma=noise_multipliers, steps=step_counts)
def test_curve_is_non_decreasing_in_the_sample_rate(
    qs: tuple[float, float], sigma: float, steps: int
) -> None:
    small, large = sorted(qs)
    rarer = rdp.subsampled_gaussian(small, sigma, steps, ORDERS)
    assert np.all(
        rarer <= rdp.subsampled_gaussian(large, sigma, steps, ORDERS) * (1 + 1e-12) + slack(steps)
    )


@PROPERTY
@given(q=sample_rates, sigma=noise_multipliers, steps=st.tuples(step_counts, step_counts))
def test_curve_is_non_decreasing_in_steps(q: float, sigma: float, steps: tuple[int, int]) -> None:
    fewer, more = sorted(steps)
    assert np.all(
        rdp.subsampled_gaussian(q, sigma, fewer, ORDERS)
        <= rdp.subsampled_gaussian(q, sigma, more, ORDERS)
    )


@PROPERTY
@given(q=sample_rates, sigma=noise_multipliers, steps=st.integers(1, 300))
def test_composition_is_additive(q: float, sigma: float, steps: int) -> None:
    """k steps at once cost exactly k single steps, composed one by one."""
    one = rdp.subsampled_gaussian(q, sigma, 1, ORDERS)
    many = rdp.subsampled_gaussian(q, sigma, steps, ORDERS)
    composed = np.zeros_like(one)
    for _ in range(steps):
        composed = composed + one
    np.testing.assert_allclose(many, composed, rtol=1e-12)
    np.testing.assert_allclose(many, steps * one, rtol=1e-15)


@PROPERTY
@given(
    kind=st.sampled_from(["gaussian", "laplace", "pure_dp"]),
    scale=log_uniform(0.05, 50.0),
    steps=st.integers(1, 10**6),
)
def test_other_mechanisms_compose_and_grow_with_the_order(
    kind: str, scale: float, steps: int
) -> None:
    function = {"gaussian": rdp.gaussian, "laplace": rdp.laplace, "pure_dp": rdp.pure_dp}[kind]
    one = function(scale, 1, ORDERS)
    many = function(scale, steps, ORDERS)
    np.testing.assert_allclose(many, steps * one, rtol=1e-15)
    assert np.all(one[:-1] <= one[1:] * (1 + 1e-12))
    assert np.all(np.isfinite(one)) and np.all(one > 0)


curves = st.lists(
    st.one_of(st.floats(0.0, 1e6), st.just(0.0), st.just(math.inf)),
    min_size=ORDERS.size,
    max_size=ORDERS.size,
).map(np.array)


@PROPERTY
@given(curve=curves, delta=deltas)
def test_epsilon_is_never_negative_nor_nan(curve: np.ndarray, delta: float) -> None:
    eps, order = rdp.to_epsilon(curve, delta, ORDERS)
    assert eps >= 0.0 and not math.isnan(eps)
    assert order in ORDERS
    if np.all(np.isinf(curve)):
        assert eps == math.inf


@PROPERTY
@given(curve=curves, bump=curves, delta=deltas)
def test_epsilon_is_monotone_in_the_curve(
    curve: np.ndarray, bump: np.ndarray, delta: float
) -> None:
    assert rdp.to_epsilon(curve, delta, ORDERS)[0] <= rdp.to_epsilon(curve + bump, delta, ORDERS)[0]


@PROPERTY
@given(curve=curves, ds=st.tuples(deltas, deltas))
def test_epsilon_is_non_increasing_in_delta(curve: np.ndarray, ds: tuple[float, float]) -> None:
    small, large = sorted(ds)
    assert rdp.to_epsilon(curve, large, ORDERS)[0] <= rdp.to_epsilon(curve, small, ORDERS)[0]


@PROPERTY
@given(delta=deltas)
def test_zero_curve_is_zero_epsilon(delta: float) -> None:
    assert rdp.to_epsilon(np.zeros(ORDERS.size), delta, ORDERS)[0] == 0.0


def test_tiny_curve_is_zero_epsilon_by_the_kl_bound() -> None:
    """ρ ≤ -log(1-δ²) gives (0, δ)-DP (Bretagnolle–Huber), as in dp_accounting.

    At δ = 1e-10 the Balle et al. formula alone is positive at every order of the grid, so
    only the KL bound can give 0, and only below its threshold.
    """
    delta = 1e-10
    threshold = -math.log1p(-(delta**2))
    below, above = np.full(ORDERS.size, 0.5 * threshold), np.full(ORDERS.size, 2 * threshold)
    assert balle_epsilon(below, ORDERS, delta) > 0.01
    assert rdp.to_epsilon(below, delta, ORDERS)[0] == 0.0
    assert rdp.to_epsilon(above, delta, ORDERS)[0] == balle_epsilon(above, ORDERS, delta)
