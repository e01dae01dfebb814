"""The subsampled-Gaussian curves and the ε conversion, against dp_accounting, Opacus and mpmath.

Known, intended difference: for fractional orders dp_accounting sums |C(α,i)| (an upper
bound, loose at small α and large q), while we sum with signs and bound the alternating
tail (tight). Where the two differ by more than 1e-6 we must be the lower one, and the
numerical integral of A_α (mpmath) must agree with us, never above us.
"""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as ra

from accountant import rdp
from tests.accountant.accountant_reference import (
    DP_ACCOUNTING_ORDERS,
    balle_epsilon,
    sampled_gaussian_rdp,
)

ORDERS = DP_ACCOUNTING_ORDERS
FRACTIONAL = np.floor(ORDERS) != ORDERS

# Regimes where dp_accounting is itself accurate (at integer orders, to ~1e-8; its plain
# log-sum-exp loses relative precision once the per-step RDP is ~1e-10, i.e. tiny q with
# σ = 50, which the mpmath tests below cover instead).
PAIRS = [
    *[(q, s) for q in (256 / 60000, 0.01, 0.05) for s in (0.5, 0.8, 1.1, 2.0, 5.0, 50.0)],
    *[(1e-3, s) for s in (0.5, 1.1, 2.0, 5.0)],
    *[(1.0, s) for s in (0.5, 1.1, 50.0)],
]
STEPS = (1, 10**6)
DELTAS = (1e-5, 1e-9)


def assert_matches_truth(ours: float, truth: float, alpha: float, steps: int = 1) -> None:
    """Ours is an upper bound (never below by more than rounding) and tight.

    Tight means within 1e-8 relative, or within the documented absolute accuracy of the
    fractional-order series: 2e-12 in log A_α per step (its tail bound of 1e-12 relative
    plus a rounding margin), which dominates only when A_α - 1 is itself tiny.
    """
    assert ours >= truth * (1 - 1e-12), (alpha, ours, truth)
    assert ours - truth <= max(1e-8 * truth, steps * 2e-12 / (alpha - 1)), (alpha, ours, truth)


@pytest.mark.parametrize(("q", "sigma"), PAIRS)
def test_curves_agree_with_dp_accounting(q: float, sigma: float) -> None:
    theirs_one_step = ra._compute_rdp_poisson_subsampled_gaussian(q, sigma, ORDERS)
    for steps in STEPS:
        ours = rdp.subsampled_gaussian(q, sigma, steps, ORDERS)
        theirs = theirs_one_step * steps
        assert np.all(np.isfinite(ours))
        np.testing.assert_allclose(ours[~FRACTIONAL], theirs[~FRACTIONAL], rtol=1e-6)
        if q == 1.0:  # the plain Gaussian: both are α/(2σ²)·steps
            np.testing.assert_allclose(ours, theirs, rtol=1e-12)
            continue
        # dp_accounting gives up (inf) on some small fractional orders at larger q; we don't.
        close = np.abs(ours - theirs) <= 1e-6 * theirs
        differ = FRACTIONAL & ~close
        assert np.all(ours[differ] < theirs[differ]), ORDERS[differ & (ours >= theirs)]

    # Where they differ most, the numerical integral sides with us.
    ours = rdp.subsampled_gaussian(q, sigma, 1, ORDERS)
    with np.errstate(invalid="ignore"):
        gap = np.where(FRACTIONAL, (theirs_one_step - ours) / ours, -np.inf)
    if q < 1.0 and gap.max() > 1e-6:
        worst = int(np.argmax(np.where(np.isinf(gap), 1e300, gap)))
        alpha = float(ORDERS[worst])
        assert_matches_truth(float(ours[worst]), sampled_gaussian_rdp(q, sigma, alpha), alpha)


@pytest.mark.parametrize(("q", "sigma"), PAIRS)
def test_epsilon_agrees_with_dp_accounting(q: float, sigma: float) -> None:
    theirs_one_step = ra._compute_rdp_poisson_subsampled_gaussian(q, sigma, ORDERS)
    for steps in STEPS:
        ours_curve = rdp.subsampled_gaussian(q, sigma, steps, ORDERS)
        for delta in DELTAS:
            eps, order = rdp.to_epsilon(ours_curve, delta, ORDERS)
            # The conversion alone, on the same curve: dp_accounting's and a hand-written one.
            same_curve_eps, same_curve_order = ra.compute_epsilon(ORDERS, ours_curve, delta)
            assert eps == pytest.approx(same_curve_eps, rel=1e-12, abs=1e-14)
            assert eps == pytest.approx(balle_epsilon(ours_curve, ORDERS, delta), rel=1e-12)
            if eps > 0:
                assert order == same_curve_order
            # End to end: equal to 1e-6, or lower because a fractional order is tighter.
            theirs_eps, _ = ra.compute_epsilon(ORDERS, theirs_one_step * steps, delta)
            if abs(eps - theirs_eps) > 1e-6 * theirs_eps:
                assert eps < theirs_eps
                assert order != np.floor(order), (steps, delta, order)


@pytest.mark.parametrize(("q", "sigma"), [pair for pair in PAIRS if pair[0] < 1.0])
def test_fractional_orders_agree_with_opacus(q: float, sigma: float) -> None:
    """Opacus sums the fractional series with signs too, so it agrees with us where it is accurate.

    Opacus stops its series at an absolute term size of e^-30 ≈ 1e-13, so we compare only
    where log A_α ≥ 1e-6 (there its cut-off is below 1e-7 relative).
    """
    ordp = pytest.importorskip("opacus.accountants.analysis.rdp")
    fractional = ORDERS[FRACTIONAL]
    theirs = np.asarray(
        ordp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(fractional))
    )
    ours = rdp.subsampled_gaussian(q, sigma, 1, fractional)
    accurate = ours * (fractional - 1) >= 1e-6
    assert accurate.sum() >= 20 or sigma == 50.0
    np.testing.assert_allclose(ours[accurate], theirs[accurate], rtol=1e-6)


# Large q and small α: where dp_accounting's |C(α,i)| sum is loosest (or gives up).
LOOSE_REGIME = [
    *[(q, s, a) for q in (0.2, 0.5, 0.9, 0.99) for s in (0.5, 1.1, 5.0) for a in (1.1, 1.5, 2.5)],
    *[(q, 50.0, a) for q in (0.2, 0.9, 0.99) for a in (1.1, 2.5)],
]


@pytest.mark.parametrize(("q", "sigma", "alpha"), LOOSE_REGIME)
def test_fractional_orders_match_mpmath_where_dp_accounting_is_loose(
    q: float, sigma: float, alpha: float
) -> None:
    truth = sampled_gaussian_rdp(q, sigma, alpha)
    ours = float(rdp.subsampled_gaussian(q, sigma, 1, [alpha])[0])
    assert ours >= truth * (1 - 1e-12)
    assert ours <= truth * (1 + 1e-8)
    theirs = float(ra._compute_rdp_poisson_subsampled_gaussian(q, sigma, [alpha])[0])
    assert theirs >= truth * (1 - 1e-12)  # the reference is right about dp_accounting, too
    if theirs > truth * (1 + 1e-6):
        assert ours < theirs


# Tiny per-step RDP (A_α - 1 ≈ 1e-13…1e-8): the absolute accuracy term is what shows.
TINY_REGIME = [
    (q, s, a)
    for q, s in ((1e-4, 5.0), (1e-4, 50.0), (1e-3, 50.0), (256 / 60000, 50.0))
    for a in (1.1, 1.5, 2.5, 7.7)
]


@pytest.mark.parametrize(("q", "sigma", "alpha"), TINY_REGIME)
def test_fractional_orders_stay_upper_bounds_for_tiny_values(
    q: float, sigma: float, alpha: float
) -> None:
    truth = sampled_gaussian_rdp(q, sigma, alpha)
    for steps in (1, 10**6):
        ours = float(rdp.subsampled_gaussian(q, sigma, steps, [alpha])[0])
        assert_matches_truth(ours, truth * steps, alpha, steps)


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [(0.01, 0.5, 3.0), (0.5, 1.1, 2.0), (0.9, 0.5, 7.0), (1e-4, 50.0, 2.0), (0.05, 5.0, 32.0)],
)
def test_integer_orders_match_mpmath(q: float, sigma: float, alpha: float) -> None:
    truth = sampled_gaussian_rdp(q, sigma, alpha)
    ours = float(rdp.subsampled_gaussian(q, sigma, 1, [alpha])[0])
    assert ours == pytest.approx(truth, rel=1e-12)


def test_plain_gaussian_is_the_q_equals_one_case() -> None:
    orders = ORDERS
    np.testing.assert_array_equal(
        rdp.subsampled_gaussian(1.0, 1.7, 9, orders), rdp.gaussian(1.7, 9, orders)
    )
    np.testing.assert_allclose(rdp.gaussian(1.7, 9, orders), 9 * orders / (2 * 1.7**2), rtol=1e-15)
