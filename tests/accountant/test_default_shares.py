"""The default profile (shares of δ from (cap, δ) alone): what bench/tightness.py's sweep claims.

Fill σ: the smallest σ with which a plan fits an empty dataset (calibrate.fit_remaining),
against the σ non-adaptive RDP at the full δ needs on a dense grid (independent calibration).
"""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest

from accountant import calibrate, exact, rdp
from accountant.members import MemberFilter, PureTotal, default_shares, uniform_shares
from bench.tightness import DENSE_ORDERS

MNIST_Q, MNIST_STEPS = 256 / 60000, 14100


def fill_ratio(cap: float, delta: float, q: float, steps: int, profile: str) -> float:
    shares = default_shares(cap, delta) if profile == "default" else uniform_shares()
    privacy_filter = MemberFilter(cap, delta, shares)
    fill = calibrate.fit_remaining(privacy_filter, [0] * privacy_filter.orders.size, q, steps, 1)
    return fill / calibrate.noise_multiplier(cap, delta, q, steps, DENSE_ORDERS)


@pytest.mark.parametrize("cap", [0.05, 0.5, 1.0, 1.5, 3.0, 8.0, 50.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-7, 1e-10])
def test_shares_are_exact_reproducible_and_sum_to_one(cap: float, delta: float) -> None:
    first, again = default_shares(cap, delta), default_shares(cap, delta)
    assert first == again and first.params() == again.params()
    assert all(isinstance(w, Fraction) for w in first.weights)
    assert sum(first.weights, Fraction(0)) == 1
    # Band orders that coincide with α* (top of the grid at tiny caps) merge into it.
    assert max(first.weights) >= Fraction(17, 20)
    assert 35 <= len(first.orders) <= 38 and list(first.orders) == sorted(first.orders)


def test_default_shares_are_fast() -> None:
    started = time.perf_counter()
    for _ in range(20):
        default_shares(3.0, 1e-5)
    assert (time.perf_counter() - started) / 20 < 0.02


@pytest.mark.parametrize(
    ("eps", "cap"), [(1.0, 1.5), (1.0, 1.6), (2.0, 3.0)], ids=["1-on-1.5", "1-on-1.6", "2-on-3"]
)
def test_short_runs_that_uniform_admits_are_admitted(eps: float, cap: float) -> None:
    """q = 0.01, 300 steps: the previous default (9/10 on one order) refused the first and last."""
    delta = 1e-5
    sigma = calibrate.noise_multiplier(eps, delta, 0.01, 300, DENSE_ORDERS)
    figures = {}
    for name, shares in (("default", default_shares(cap, delta)), ("uniform", uniform_shares())):
        privacy_filter = MemberFilter(cap, delta, shares)
        units = exact.to_units(rdp.subsampled_gaussian(0.01, sigma, 300, shares.orders))
        curve = exact.to_curve(units)
        assert privacy_filter.admits(curve, PureTotal(impure=1))
        figures[name] = privacy_filter.epsilon(curve, PureTotal(impure=1))
        # Never below the run's own non-adaptive ε at the full δ.
        assert figures[name] >= rdp.to_epsilon(curve, delta, shares.orders)[0] - 1e-12
    # Partway figures: within 7 % of uniform's (bench shape sweep: 1.415 against 1.323).
    assert figures["default"] <= 1.075 * figures["uniform"]


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
@pytest.mark.parametrize("cap", [0.5, 1.0, 3.0, 8.0])
@pytest.mark.parametrize(
    ("q", "steps"), [(1.0, 1), (MNIST_Q, MNIST_STEPS)], ids=["gaussian", "mnist"]
)
def test_gaussian_and_mnist_plans_fill_the_cap_within_a_percent(
    cap: float, delta: float, q: float, steps: int
) -> None:
    assert fill_ratio(cap, delta, q, steps, "default") <= 1.01 or (q < 1 and cap == 8.0)


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
@pytest.mark.parametrize("cap", [0.5, 1.0, 3.0, 8.0])
@pytest.mark.parametrize(("q", "steps"), [(1e-3, 1), (1e-2, 10), (1e-2, 300), (0.1, 10)])
def test_bent_curves_never_need_much_more_noise_than_under_uniform_shares(
    cap: float, delta: float, q: float, steps: int
) -> None:
    """Shapes whose best order sits far below the Gaussian one (worst case of the sweep)."""
    default = fill_ratio(cap, delta, q, steps, "default")
    uniform = fill_ratio(cap, delta, q, steps, "uniform")
    assert default <= 1.035 * uniform
    assert default <= 1.2
    assert np.isfinite(default)
