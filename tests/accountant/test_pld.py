"""The PLD ε of one DP-SGD plan (`accountant.pld`) against dp_accounting, exact Gaussian ε, RDP.

References: the published PLD column of /work/shared/reference/published-figures.md (dp_accounting's
PLD accountant at value_discretization_interval 1e-4), dp_accounting run live on small plans,
values of dp_accounting cached below for plans too slow to run here, and the exact ε of the plain
Gaussian mechanism (Balle & Wang 2018, `calibrate.gaussian_epsilon`), which the PLD must never
undercut. Every PLD ε must also be at most the RDP ε of the same plan.
"""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from accountant import calibrate, pld

MNIST_Q = 256 / 60000

# (q, σ, steps, δ, PLD ε): the published figures' PLD column (4 places).
PUBLISHED = [
    (MNIST_Q, 1.1, 14063, 1e-5, 2.3818),  # TF Privacy MNIST tutorial, 60 epochs
    (MNIST_Q, 1.3, 3516, 1e-5, 0.8646),
    (MNIST_Q, 0.7, 10547, 1e-5, 5.6397),
    (240 / 60000, 1.1, 15000, 1e-5, 2.2955),  # Opacus MNIST example
    (0.04, 1.5, 2250, 1e-5, 6.7688),  # Opacus accountant test
    (0.01, 4.0, 10000, 1e-5, 0.9470),  # Abadi et al. 2016, 100 epochs
    (150 / 60000, 1.3, 6000, 1e-5, 0.6401),  # TF Privacy test
]

# dp_accounting 0.6.0 PLDAccountant(value_discretization_interval=1e-4), ADD_OR_REMOVE_ONE,
# PoissonSampledDpEvent(q, GaussianDpEvent(σ)) composed `steps` times; computed 2026-12-01
# (0.5–2 s each, too slow to rerun in the suite). CIFAR-like: 50,000 examples, batch 256 or 512.
CACHED_DP_ACCOUNTING = [
    (256 / 50000, 1.0, 5850, 1e-5, 2.1561643950796343),  # 30 epochs
    (256 / 50000, 0.8, 3900, 1e-5, 2.891122161185373),  # 20 epochs
    (512 / 50000, 1.5, 9750, 1e-6, 3.629717394322815),  # 100 epochs
]

# Small plans dp_accounting computes here in well under a second each.
LIVE = [
    (1.0, 2.0, 10, 1e-5),  # q = 1: the plain Gaussian
    (0.5, 3.0, 20, 1e-5),
    (0.1, 2.0, 50, 1e-6),
    (0.01, 1.0, 100, 1e-5),
    (0.02, 10.0, 1000, 1e-7),
    (1e-4, 1.0, 10, 1e-5),
]

# The plain Gaussian (q = 1): k steps of σ are one Gaussian of σ/√k, whose ε is known exactly.
GAUSSIAN = [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (5.0, 100, 1e-6), (0.5, 4, 1e-5), (10.0, 1000, 1e-3)]


def dp_accounting_pld(q: float, sigma: float, steps: int, delta: float) -> float:
    """dp_accounting's PLD ε at its default discretisation (1e-4), add/remove neighbours."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_event.GaussianDpEvent(sigma)
    if q < 1.0:
        event = dp_event.PoissonSampledDpEvent(q, event)
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "published"), PUBLISHED)
def test_published_pld_figures(
    q: float, sigma: float, steps: int, delta: float, published: float
) -> None:
    eps = pld.dp_sgd_epsilon(q, sigma, steps, delta)
    assert abs(eps - published) <= 0.5e-4
    assert eps < calibrate.dp_sgd_epsilon(sigma, delta, q, steps)


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "reference"), CACHED_DP_ACCOUNTING)
def test_cifar_like_plans_match_cached_dp_accounting(
    q: float, sigma: float, steps: int, delta: float, reference: float
) -> None:
    eps = pld.dp_sgd_epsilon(q, sigma, steps, delta)
    # Both are pessimistic estimates on the same grid: equal to ~1e-6, never far below.
    assert reference * (1 - 1e-5) <= eps <= reference * (1 + 1e-3)
    assert eps < calibrate.dp_sgd_epsilon(sigma, delta, q, steps)


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), LIVE)
def test_matches_dp_accounting_live(q: float, sigma: float, steps: int, delta: float) -> None:
    reference = dp_accounting_pld(q, sigma, steps, delta)
    eps = pld.dp_sgd_epsilon(q, sigma, steps, delta)
    assert reference * (1 - 1e-5) - 1e-7 <= eps <= reference * (1 + 1e-3) + 1e-5
    assert eps <= calibrate.dp_sgd_epsilon(sigma, delta, q, steps)


@pytest.mark.parametrize(("sigma", "steps", "delta"), GAUSSIAN)
def test_plain_gaussian_is_never_below_the_exact_epsilon(
    sigma: float, steps: int, delta: float
) -> None:
    exact = calibrate.gaussian_epsilon(sigma / math.sqrt(steps), delta)
    eps = pld.dp_sgd_epsilon(1.0, sigma, steps, delta)
    assert exact - 1e-9 <= eps <= exact * (1 + 1e-4) + 1e-6


def test_finer_discretisation_converges_from_above() -> None:
    """The error at the default grid is small and one-sided: halving h never raises ε."""
    plan = (0.01, 1.0, 1000, 1e-5)
    coarse = pld.dp_sgd_epsilon(*plan, discretisation=1e-3)
    default = pld.dp_sgd_epsilon(*plan)
    fine = pld.dp_sgd_epsilon(*plan, discretisation=2.5e-5)
    assert fine <= default <= coarse
    assert default - fine <= 1e-3 * fine
    assert coarse - fine > default - fine  # the coarse grid is visibly looser


def test_monotone_in_steps_and_noise() -> None:
    by_steps = [pld.dp_sgd_epsilon(MNIST_Q, 1.1, k, 1e-5) for k in (235, 470, 1000, 2350, 4700)]
    assert by_steps == sorted(by_steps)
    assert len(set(by_steps)) == len(by_steps)
    by_sigma = [pld.dp_sgd_epsilon(MNIST_Q, s, 2350, 1e-5) for s in (0.8, 1.0, 1.2, 1.5, 2.0)]
    assert by_sigma == sorted(by_sigma, reverse=True)
    assert len(set(by_sigma)) == len(by_sigma)
    by_delta = [pld.dp_sgd_epsilon(MNIST_Q, 1.1, 2350, d) for d in (1e-8, 1e-6, 1e-4, 1e-2)]
    assert by_delta == sorted(by_delta, reverse=True)


def test_enough_delta_gives_zero_epsilon() -> None:
    """Huge noise: δ covers the whole total variation, so ε is 0 (not negative, not NaN)."""
    assert pld.dp_sgd_epsilon(0.01, 1e4, 100, 1e-3) == 0.0


@settings(max_examples=15, deadline=None)
@given(
    q=st.floats(1e-4, 0.1),
    sigma=st.floats(0.8, 20.0),
    steps=st.integers(1, 2000),
    delta=st.floats(1e-8, 1e-2),
)
def test_finite_non_negative_and_below_rdp(
    q: float, sigma: float, steps: int, delta: float
) -> None:
    eps = pld.dp_sgd_epsilon(q, sigma, steps, delta)
    assert math.isfinite(eps)
    assert eps >= 0.0
    # Both bound the same true ε from above; the PLD exceeds it by its discretisation error
    # (second order in h, ~1e-4 at most here), so where RDP is tight (e.g. 0 by
    # Bretagnolle–Huber: q = 1e-4, σ = 6, 49 steps, δ = 1e-4 gives PLD 9e-8) it may be that
    # much above RDP, never more.
    assert eps <= calibrate.dp_sgd_epsilon(sigma, delta, q, steps) + 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": math.nan}, "sample_rate"),
        ({"sample_rate": "0.01"}, "sample_rate"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.inf}, "noise_multiplier"),
        ({"steps": 0}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 10**8}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 1e-11}, "delta"),
        ({"discretisation": 0.0}, "discretisation"),
        ({"discretisation": 1e-7}, "discretisation"),
        ({"discretisation": 0.5}, "discretisation"),
        # Too little noise for the grid: one step alone spans millions of grid points.
        ({"noise_multiplier": 0.05}, "discretisation"),
        # Too many steps at a large rate: the composed loss is too wide to hold.
        ({"sample_rate": 0.5, "steps": 10**6}, "discretisation"),
    ],
)
def test_argument_validation(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "sample_rate": 0.01,
        "noise_multiplier": 1.0,
        "steps": 100,
        "delta": 1e-5,
    }
    arguments.update(kwargs)
    discretisation = arguments.pop("discretisation", pld.DEFAULT_DISCRETISATION)
    with pytest.raises(ValueError, match=message):
        pld.dp_sgd_epsilon(**arguments, discretisation=discretisation)  # type: ignore[arg-type]
