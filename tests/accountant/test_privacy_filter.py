"""The cap filter: what it admits never reports more than the cap, and its budgets are the
conversion of Balle et al. 2020 at δ/|Λ|, written out here independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accountant import DEFAULT_ORDERS, Filter, calibrate, mechanisms, rdp


def log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: float(10.0**e))


def reference_budgets(cap: float, delta: float, orders: np.ndarray) -> np.ndarray:
    """B_α = cap - log(1-1/α) + (log(δ/|Λ|) + log α)/(α-1): solve Prop. 12 for ρ."""
    d = delta / orders.size
    offset = np.log((orders - 1) / orders) - (np.log(d) + np.log(orders)) / (orders - 1)
    return np.asarray(cap - offset, dtype=np.float64)


mechanism_values = st.one_of(
    st.builds(
        mechanisms.SubsampledGaussian,
        sample_rate=log_uniform(1e-4, 1.0),
        noise_multiplier=log_uniform(0.5, 20.0),
        steps=st.integers(1, 5000),
    ),
    st.builds(
        mechanisms.Gaussian, noise_multiplier=log_uniform(0.5, 50.0), steps=st.integers(1, 50)
    ),
    st.builds(mechanisms.Laplace, scale=log_uniform(0.2, 100.0), steps=st.integers(1, 50)),
    st.builds(mechanisms.PureDP, epsilon=log_uniform(0.01, 3.0), steps=st.integers(1, 20)),
)


@settings(max_examples=40, deadline=None)
@given(
    cap=log_uniform(0.1, 20.0),
    delta=log_uniform(1e-10, 1e-3),
    requests=st.lists(mechanism_values, min_size=1, max_size=6),
)
def test_filter_never_admits_a_total_over_the_cap(
    cap: float, delta: float, requests: list[mechanisms.Mechanism]
) -> None:
    """Keep sending the mix until three refusals: every admitted total stays within the cap."""
    privacy_filter = Filter(cap, delta)
    costs = [request.rdp() for request in requests]
    total = np.zeros(DEFAULT_ORDERS.size)
    refusals = admitted = 0
    for attempt in range(400):
        cost = costs[attempt % len(costs)]
        if privacy_filter.admits(total + cost):
            total = total + cost
            admitted += 1
            assert privacy_filter.epsilon(total) <= cap
        else:
            refusals += 1
            # Refused only when no order has room: the rule is "some order fits".
            assert np.all(total + cost > privacy_filter.budgets())
            if refusals == 3:
                break
    assert refusals == 3 or admitted == 400
    # The total is what was admitted, so the reported figure is within the cap too.
    assert privacy_filter.epsilon(total) <= cap


@pytest.mark.parametrize("cap", [0.05, 0.5, 1.0, 3.0, 8.0, 50.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-9])
def test_budgets_are_the_conversion_at_delta_over_the_grid_size(cap: float, delta: float) -> None:
    privacy_filter = Filter(cap, delta)
    budgets = privacy_filter.budgets()
    assert privacy_filter.delta_per_order == delta / DEFAULT_ORDERS.size
    expected = reference_budgets(cap, delta, DEFAULT_ORDERS)
    # Shaded down by a hair so rounding can never push an admitted total over the cap.
    assert np.all(budgets <= expected)
    np.testing.assert_allclose(budgets, expected, rtol=1e-8, atol=1e-8)
    for index, alpha in enumerate(DEFAULT_ORDERS):
        budget = budgets[index]
        if budget < 0:
            continue
        at_budget = rdp.to_epsilon([budget], privacy_filter.delta_per_order, [alpha])[0]
        assert cap - 1e-7 * max(1.0, cap) <= at_budget <= cap
        over = budget + 1e-6 * max(1.0, budget)
        assert rdp.to_epsilon([over], privacy_filter.delta_per_order, [alpha])[0] > cap


def test_one_order_with_room_is_enough() -> None:
    privacy_filter = Filter(2.0, 1e-6)
    budgets = privacy_filter.budgets()
    with_room = np.flatnonzero(budgets >= 0)
    assert with_room.size >= 10
    for index in with_room[[0, with_room.size // 2, -1]]:
        total = np.maximum(budgets, 0.0) + 1.0
        total[index] = budgets[index]
        assert privacy_filter.admits(total)
        assert privacy_filter.epsilon(total) <= 2.0
        total[index] = budgets[index] + 1e-6
        assert not privacy_filter.admits(total)
        assert privacy_filter.epsilon(total) > 2.0


def test_reported_epsilon_is_the_conversion_at_delta_over_the_grid_size() -> None:
    privacy_filter = Filter(10.0, 1e-5)
    total = rdp.subsampled_gaussian(0.01, 1.0, 1000) + rdp.laplace(2.0, 3)
    delta_per_order = 1e-5 / DEFAULT_ORDERS.size
    assert privacy_filter.epsilon(total) == rdp.to_epsilon(total, delta_per_order)[0]
    assert privacy_filter.epsilon(total) > rdp.to_epsilon(total, 1e-5)[0]


def test_plan_calibrated_alone_pays_the_union_bound_in_the_filter() -> None:
    """σ calibrated to ε=3 on its own reports ε≈3.53 under a cap of 3: it does not fit.

    This is the δ/|Λ| price of a filter that is valid under adaptive composition
    (docs/accounting.md quotes these numbers).
    """
    q, steps = 256 / 60000, 14063
    sigma = calibrate.noise_multiplier(3.0, 1e-5, q, steps)
    plan = rdp.subsampled_gaussian(q, sigma, steps)
    privacy_filter = Filter(3.0, 1e-5)
    assert rdp.to_epsilon(plan, 1e-5)[0] == pytest.approx(3.0, abs=0.01)
    assert privacy_filter.epsilon(plan) == pytest.approx(3.5318, abs=1e-4)
    assert not privacy_filter.admits(plan)
    assert Filter(3.54, 1e-5).admits(plan)


def test_zero_cap_admits_nothing() -> None:
    privacy_filter = Filter(0.0, 1e-5)
    assert np.all(privacy_filter.budgets() < 0)
    assert not privacy_filter.admits(rdp.pure_dp(1e-6))


def test_filter_state_cannot_be_changed_from_outside() -> None:
    privacy_filter = Filter(1.0, 1e-5)
    budgets = privacy_filter.budgets()
    budgets[:] = 1e9
    assert not privacy_filter.admits(np.full(DEFAULT_ORDERS.size, 100.0))
    with pytest.raises(ValueError):
        privacy_filter.orders[0] = 1.5
    assert repr(privacy_filter) == "Filter(epsilon_cap=1.0, delta=1e-05, orders=35)"
