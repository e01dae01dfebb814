"""Published privacy figures (docs: /work/shared/reference/published-figures.md), reproduced.

Every number here comes from a paper, a library's own test or tutorial, or an independent
computation that we cite; none is our own output pasted back.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from accountant import CALIBRATION_ORDERS, calibrate, rdp
from tests.accountant.accountant_reference import (
    DP_ACCOUNTING_ORDERS,
    balle_epsilon,
    sampled_gaussian_rdp,
)

MNIST_Q = 256 / 60000

# (q, σ, steps, δ, ε with the improved conversion on dp_accounting's default order grid).
IMPROVED = [
    (MNIST_Q, 1.1, 14063, 1e-5, 2.5967),  # TF Privacy MNIST tutorial, 60 epochs
    (MNIST_Q, 1.3, 3516, 1e-5, 0.9546),
    (MNIST_Q, 0.7, 10547, 1e-5, 6.3184),
    (240 / 60000, 1.1, 15000, 1e-5, 2.5029),  # Opacus MNIST example
    (0.04, 1.5, 2250, 1e-5, 7.3291),  # Opacus accountant test
    (0.01, 4.0, 10000, 1e-5, 1.0355),  # Abadi et al. 2016, 100 epochs
    (150 / 60000, 1.3, 6000, 1e-5, 0.7242),  # TF Privacy test
]


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "published"), IMPROVED)
def test_improved_conversion_figures(
    q: float, sigma: float, steps: int, delta: float, published: float
) -> None:
    curve = rdp.subsampled_gaussian(q, sigma, steps, DP_ACCOUNTING_ORDERS)
    eps, _ = rdp.to_epsilon(curve, delta, DP_ACCOUNTING_ORDERS)
    assert abs(eps - published) <= 0.5e-4


def test_mnist_tutorial_figure_and_order() -> None:
    curve = rdp.subsampled_gaussian(MNIST_Q, 1.1, 14063, DP_ACCOUNTING_ORDERS)
    eps, order = rdp.to_epsilon(curve, 1e-5, DP_ACCOUNTING_ORDERS)
    assert round(eps, 4) == 2.5967
    assert order == pytest.approx(8.1)


def test_opacus_accountant_test_value_is_reproduced_exactly() -> None:
    """Opacus' test pins 7.32911117143 (its exact, signed fractional sums); we are exact too.

    dp_accounting's |C(α,i)| sums give 7.32933 here, so this row tells the two apart.
    """
    curve = rdp.subsampled_gaussian(0.04, 1.5, 2250, DP_ACCOUNTING_ORDERS)
    eps, order = rdp.to_epsilon(curve, 1e-5, DP_ACCOUNTING_ORDERS)
    assert eps == pytest.approx(7.32911117143, abs=1e-9)
    assert order == pytest.approx(3.9)  # a fractional order: the signed sum matters
    # …and it is mpmath's value at that order, not just Opacus'.
    truth = sampled_gaussian_rdp(0.04, 1.5, 3.9) * 2250
    assert curve[order == DP_ACCOUNTING_ORDERS][0] == pytest.approx(truth, rel=1e-9)


def test_tf_privacy_order_19_value() -> None:
    curve = rdp.subsampled_gaussian(150 / 60000, 1.3, 6000, DP_ACCOUNTING_ORDERS)
    eps, order = rdp.to_epsilon(curve, 1e-5, DP_ACCOUNTING_ORDERS)
    assert eps == pytest.approx(0.7242234026109595, abs=1e-9)
    assert order == 19.0


def test_dp_accounting_rdp_test_vector() -> None:
    """dp_accounting's own test: σ=2.5, q=0.01, 50 steps, orders [1.5, 2.5, 5, 50, 100].

    The integer orders match its published values. At 1.5 and 2.5 its values are
    |C(α,i)| upper bounds; ours are lower and equal the numerical integral.
    """
    orders = [1.5, 2.5, 5, 50, 100]
    published = np.array([6.70579741e-4, 1.08548710e-3, 2.18075656e-3, 2.38460375e-2, 1.67416308e2])
    curve = rdp.subsampled_gaussian(0.01, 2.5, 50, orders)
    np.testing.assert_allclose(curve[2:], published[2:], rtol=1e-8)
    assert np.all(curve[:2] < published[:2] * (1 - 1e-5))
    for value, alpha in zip(curve[:2], orders[:2], strict=True):
        assert value == pytest.approx(50 * sampled_gaussian_rdp(0.01, 2.5, alpha), rel=1e-8)


def test_heterogeneous_composition_example() -> None:
    """Opacus' docstring (dp_accounting agrees): two phases composed, orders 2..32."""
    orders = np.arange(2, 33, dtype=np.float64)
    curve = rdp.subsampled_gaussian(1e-5, 1.0, 10, orders) + rdp.subsampled_gaussian(
        1e-4, 3.0, 4, orders
    )
    eps, order = rdp.to_epsilon(curve, 1e-5, orders)
    assert round(eps, 5) == 0.33634
    assert order == 23.0


@pytest.mark.parametrize(
    ("epsilon", "delta", "published"),
    [(1.0, 1e-5, 3.7306), (0.5, 1e-5, 7.0318), (2.0, 1e-5, 1.9938), (1.0, 1e-6, 4.2247)],
)
def test_analytic_gaussian_figures(epsilon: float, delta: float, published: float) -> None:
    sigma = calibrate.gaussian_sigma(epsilon, delta)
    assert abs(sigma - published) <= 0.5e-4
    # Tighter than the classical √(2 ln(1.25/δ))/ε (4.8448 at ε=1, δ=1e-5).
    if epsilon <= 1.0:
        assert sigma < np.sqrt(2 * np.log(1.25 / delta)) / epsilon


def test_analytic_gaussian_scales_with_sensitivity() -> None:
    assert calibrate.gaussian_sigma(1.0, 1e-5, sensitivity=3.0) == pytest.approx(
        3 * calibrate.gaussian_sigma(1.0, 1e-5), rel=1e-12
    )


def test_noise_multiplier_beats_opacus_get_noise_multiplier() -> None:
    """Opacus' get_noise_multiplier (RDP, ε tolerance 0.01) gives σ=1.015625 for this plan.

    Ours must be no larger, and within 1e-4 of a Brent search on the same order grid run on
    an independent implementation of the curve (Opacus' compute_rdp) and of the conversion.
    """
    ordp = pytest.importorskip("opacus.accountants.analysis.rdp")
    sigma = calibrate.noise_multiplier(3.0, 1e-5, MNIST_Q, 14063)
    assert sigma <= 1.015625
    orders = CALIBRATION_ORDERS

    def excess(s: float) -> float:
        curve = np.asarray(
            ordp.compute_rdp(q=MNIST_Q, noise_multiplier=s, steps=14063, orders=list(orders))
        )
        return balle_epsilon(curve, orders, 1e-5) - 3.0

    reference = optimize.brentq(excess, 0.8, 1.2, xtol=1e-9)
    assert reference == pytest.approx(1.0140, abs=1e-4)  # the published Brent figure
    assert abs(sigma - reference) <= 1e-4
    assert sigma >= reference * (1 - 1e-6)  # never below the true crossing
