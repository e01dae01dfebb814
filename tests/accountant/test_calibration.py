"""Calibration: the σ (or b) returned meets the target, and is as small as the tolerance says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize

from accountant import CALIBRATION_ORDERS, calibrate, rdp
from tests.accountant.accountant_reference import analytic_gaussian_delta


def log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: float(10.0**e))


@settings(max_examples=30, deadline=None)
@given(
    target=log_uniform(0.05, 30.0),
    delta=log_uniform(1e-10, 1e-3),
    q=st.one_of(log_uniform(1e-4, 1.0), st.just(1.0)),
    steps=st.integers(1, 10**5),
)
def test_noise_multiplier_meets_the_target_and_is_tight(
    target: float, delta: float, q: float, steps: int
) -> None:
    try:
        sigma = calibrate.noise_multiplier(target, delta, q, steps)
    except ValueError as error:
        # Only the two honest refusals, and only when they are true.
        assert "target_epsilon" in str(error)
        if "cannot be met" in str(error):
            assert calibrate.dp_sgd_epsilon(calibrate.SIGMA_MAX, delta, q, steps) > target
        else:
            assert calibrate.dp_sgd_epsilon(calibrate.SIGMA_MIN, delta, q, steps) <= target
        return
    assert calibrate.dp_sgd_epsilon(sigma, delta, q, steps) <= target
    assert calibrate.dp_sgd_epsilon(sigma * (1 - 1e-4), delta, q, steps) > target


# Optimal orders from the bottom of the grid (large ε) to the top (small ε), and q = 1.
CONFIGS = [
    (3.0, 1e-5, 256 / 60000, 14063),
    (1.0, 1e-5, 0.01, 10000),
    (8.0, 1e-6, 0.04, 2250),
    (0.1, 1e-5, 256 / 60000, 1000),
    (40.0, 1e-5, 0.1, 100),
    (1.0, 1e-5, 1.0, 1),
    (0.5, 1e-9, 1e-3, 10**6),
]


@pytest.mark.parametrize(("target", "delta", "q", "steps"), CONFIGS)
def test_staged_search_equals_a_whole_grid_search(
    target: float, delta: float, q: float, steps: int
) -> None:
    """The coarse/window/check stages give the whole grid's answer, to 1e-6 relative."""
    sigma = calibrate.noise_multiplier(target, delta, q, steps)

    def excess(log_sigma: float) -> float:
        curve = rdp.subsampled_gaussian(q, math.exp(log_sigma), steps, CALIBRATION_ORDERS)
        return rdp.to_epsilon(curve, delta, CALIBRATION_ORDERS)[0] - target

    reference = math.exp(optimize.brentq(excess, math.log(1e-3), math.log(1e4), xtol=1e-12))
    assert sigma == pytest.approx(reference, rel=1e-6)
    assert sigma >= reference * (1 - 1e-12)


def test_a_coarser_order_grid_never_gives_less_noise() -> None:
    integer_orders = np.arange(2.0, 65.0)
    args = (2.0, 1e-5, 0.01, 5000)
    dense = calibrate.noise_multiplier(*args)
    coarse = calibrate.noise_multiplier(*args, orders=integer_orders)
    assert coarse >= dense
    assert calibrate.dp_sgd_epsilon(coarse, 1e-5, 0.01, 5000, orders=integer_orders) <= 2.0


def test_dp_sgd_epsilon_is_the_conversion_of_the_curve() -> None:
    curve = rdp.subsampled_gaussian(0.02, 1.3, 777, CALIBRATION_ORDERS)
    expected = rdp.to_epsilon(curve, 1e-6, CALIBRATION_ORDERS)[0]
    assert calibrate.dp_sgd_epsilon(1.3, 1e-6, 0.02, 777) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"target_epsilon": 1e-4, "delta": 1e-5, "sample_rate": 1.0, "steps": 10**6},
            "cannot be met",
        ),
        ({"target_epsilon": 1e6, "delta": 1e-5, "sample_rate": 1e-4, "steps": 1}, "met by any"),
    ],
)
def test_impossible_dp_sgd_targets_are_refused_clearly(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=f"target_epsilon=.*{message}"):
        calibrate.noise_multiplier(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(epsilon=log_uniform(0.05, 20.0), delta=log_uniform(1e-12, 1e-2))
def test_gaussian_sigma_meets_delta_and_is_tight(epsilon: float, delta: float) -> None:
    """Checked with an independent 50-digit evaluation of Balle & Wang's δ(σ)."""
    sigma = calibrate.gaussian_sigma(epsilon, delta)
    assert analytic_gaussian_delta(sigma, epsilon) <= delta
    assert analytic_gaussian_delta(sigma * (1 - 1e-6), epsilon) > delta


@pytest.mark.parametrize(("epsilon", "delta"), [(1e-9, 1e-12), (1e6, 0.5)])
def test_impossible_gaussian_targets_are_refused_clearly(epsilon: float, delta: float) -> None:
    with pytest.raises(ValueError, match="epsilon="):
        calibrate.gaussian_sigma(epsilon, delta)


@settings(max_examples=40, deadline=None)
@given(epsilon=log_uniform(1e-3, 100.0), sensitivity=log_uniform(1e-3, 1e3))
def test_laplace_scale_is_sensitivity_over_epsilon(epsilon: float, sensitivity: float) -> None:
    scale = calibrate.laplace_scale(epsilon, sensitivity)
    assert scale == sensitivity / epsilon
    # A Laplace release at that scale is exactly ε-DP: its RDP tends to ε (= 1/b per unit Δ).
    assert rdp.laplace(scale / sensitivity, 1, [10000.0])[0] <= epsilon


@settings(max_examples=40, deadline=None)
@given(sigma=log_uniform(0.05, 200.0), delta=log_uniform(1e-12, 1e-2))
def test_gaussian_epsilon_meets_delta_and_is_tight(sigma: float, delta: float) -> None:
    """The inverse direction, checked with the same independent 50-digit δ(σ, ε)."""
    eps = calibrate.gaussian_epsilon(sigma, delta)
    assert analytic_gaussian_delta(sigma, eps) <= delta
    if eps > 0:
        assert analytic_gaussian_delta(sigma, eps * (1 - 1e-6)) > delta
    else:
        assert analytic_gaussian_delta(sigma, 0.0) <= delta


@pytest.mark.parametrize(("epsilon", "delta"), [(0.1, 1e-5), (1.0, 1e-5), (1.0, 1e-9), (8.0, 1e-3)])
def test_gaussian_epsilon_inverts_gaussian_sigma(epsilon: float, delta: float) -> None:
    sigma = calibrate.gaussian_sigma(epsilon, delta, sensitivity=2.0)
    recovered = calibrate.gaussian_epsilon(sigma, delta, sensitivity=2.0)
    # Both directions round conservatively (σ up, ε up), so only agreement is promised.
    assert recovered == pytest.approx(epsilon, rel=1e-9)


def test_gaussian_epsilon_is_zero_when_noise_alone_meets_delta() -> None:
    assert calibrate.gaussian_epsilon(1000.0, 0.01) == 0.0


def test_gaussian_epsilon_refuses_noise_that_is_too_small() -> None:
    with pytest.raises(ValueError, match="noise_scale"):
        calibrate.gaussian_epsilon(1e-4, 1e-12)
