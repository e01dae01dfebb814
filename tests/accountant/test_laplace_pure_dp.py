"""Laplace and pure ε-DP curves against dp_accounting, closed forms at 60 digits, and integrals."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as ra

from accountant import DEFAULT_ORDERS, rdp
from tests.accountant.accountant_reference import (
    DP_ACCOUNTING_ORDERS,
    bun_steinke_pure_dp_rdp,
    laplace_rdp,
    randomized_response_rdp,
)

# Below 1.1 dp_accounting switches to a Taylor series: include orders on both sides.
LAPLACE_ORDERS = np.concatenate([[1.01, 1.05, 1.09], DEFAULT_ORDERS, [1000.0, 10000.0]])
SCALES = [0.05, 0.3, 1.0, 3.0, 10.0, 100.0, 1000.0]


@pytest.mark.parametrize("scale", SCALES)
def test_laplace_agrees_with_dp_accounting(scale: float) -> None:
    ours = rdp.laplace(scale, 1, LAPLACE_ORDERS)
    theirs = np.array([ra._laplace_rdp(1.0 / scale, float(a)) for a in LAPLACE_ORDERS])
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


@pytest.mark.parametrize("scale", SCALES)
def test_laplace_is_the_closed_form_and_within_the_pure_dp_bounds(scale: float) -> None:
    ours = rdp.laplace(scale, 1, LAPLACE_ORDERS)
    truth = np.array([laplace_rdp(scale, float(a)) for a in LAPLACE_ORDERS])
    np.testing.assert_allclose(ours, truth, rtol=1e-12)
    eps = 1.0 / scale
    assert np.all(ours <= eps)  # D_∞ of Laplace noise b on sensitivity 1 is 1/b
    assert np.all(ours <= LAPLACE_ORDERS * eps * eps / 2 * (1 + 1e-12))  # ε-DP ⇒ ε²/2-zCDP
    assert np.all(ours <= rdp.pure_dp(eps, 1, LAPLACE_ORDERS) * (1 + 1e-12))  # RR is worst


@pytest.mark.parametrize(("scale", "alpha"), [(0.5, 1.5), (1.0, 2.0), (2.0, 7.5), (10.0, 64.0)])
def test_laplace_closed_form_is_the_renyi_divergence(scale: float, alpha: float) -> None:
    """Integrate D_α(Lap(0, b) ‖ Lap(1, b)) directly, independent of Mironov's Prop. 6."""
    with mp.workdps(40):
        b, a = mp.mpf(scale), mp.mpf(alpha)

        def integrand(x: mp.mpf) -> mp.mpf:
            return mp.exp(-a * abs(x) / b - (1 - a) * abs(x - 1) / b) / (2 * b)

        direct = float(mp.log(mp.quad(integrand, [-mp.inf, 0, 1, mp.inf])) / (a - 1))
    assert rdp.laplace(scale, 1, [alpha])[0] == pytest.approx(direct, rel=1e-12)


EPSILONS = [1e-8, 1e-6, 1e-4, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0]


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_pure_dp_is_the_randomized_response_divergence(epsilon: float) -> None:
    """Tight: ε-DP ⇒ D_α ≤ D_α(RR_ε), attained by randomized response itself."""
    orders = DP_ACCOUNTING_ORDERS
    ours = rdp.pure_dp(epsilon, 1, orders)
    truth = np.array([randomized_response_rdp(epsilon, float(a)) for a in orders])
    # Never below the truth beyond rounding, and tight. (Small ε used to cancel to 1% low
    # at ε=1e-6 and to 0 at ε=1e-8; this pins the fix.)
    assert np.all(ours >= truth * (1 - 1e-12))
    np.testing.assert_allclose(ours, truth, rtol=1e-12)
    assert np.all(ours <= np.minimum(epsilon, orders * epsilon**2 / 2) * (1 + 1e-15))


@pytest.mark.parametrize("epsilon", [0.01, 0.5, 2.0])
def test_pure_dp_matches_bun_steinke_form(epsilon: float) -> None:
    orders = [1.125, 1.5, 2.0, 3.5, 10.0, 64.0]
    expected = [bun_steinke_pure_dp_rdp(epsilon, a) for a in orders]
    np.testing.assert_allclose(rdp.pure_dp(epsilon, 1, orders), expected, rtol=1e-12)


def test_pure_dp_composes_and_reports_at_most_k_epsilon() -> None:
    curve = rdp.pure_dp(0.3, 10)
    np.testing.assert_allclose(curve, 10 * rdp.pure_dp(0.3), rtol=1e-15)
    # Basic composition is a valid (3, 0)-DP bound, so ε at any δ is below 3.
    assert rdp.to_epsilon(curve, 1e-5)[0] < 3.0
