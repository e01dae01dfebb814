"""The member filter: shares of δ fixed at creation, RDP members and an exact pure-sum member.

Cross-checked against the legacy `accountant.Filter` (uniform shares must reproduce it bit for
bit) and against dp_accounting's conversion at each member's own share.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from accountant import DEFAULT_ORDERS, Filter, calibrate, exact, mechanisms, rdp
from accountant.members import (
    Member,
    MemberFilter,
    PureTotal,
    Shares,
    decimal_ceiling,
    default_shares,
    explicit_shares,
    first_admission_shares,
    heavy_order,
    plan_order,
    pure_total,
    shape_order,
    uniform_shares,
)
from accountant.orders import CALIBRATION_ORDERS
from tests.accountant.test_privacy_filter import log_uniform, mechanism_values


def history_of(
    privacy_filter: MemberFilter, requests: list[mechanisms.Mechanism]
) -> tuple[npt.NDArray[np.float64], PureTotal]:
    """(curve, pure total) of a list of mechanisms on the filter's grid."""
    curve = sum(
        (m.rdp(privacy_filter.orders) for m in requests), np.zeros(privacy_filter.orders.size)
    )
    pure = sum((pure_total(m) for m in requests), PureTotal())
    return curve, pure


shares_for = st.sampled_from(["uniform", "default", "first_admission", "explicit"])


def make_shares(kind: str, cap: float, delta: float, seed: int) -> Shares:
    if kind == "uniform":
        return uniform_shares(pure_sum=True)
    if kind == "default":
        return default_shares(cap, delta)
    rng = np.random.default_rng(seed)
    if kind == "first_admission":  # fixed by a first request: a DP-SGD plan or a release
        q = float(10 ** rng.uniform(-3, 0))
        first = mechanisms.SubsampledGaussian(q, 1.0, int(rng.integers(1, 20000)))
        return first_admission_shares(cap, delta, first if seed % 3 else mechanisms.Gaussian(2.0))
    raw = rng.integers(0, 5, DEFAULT_ORDERS.size)
    raw[0] += 1  # at least one member
    return explicit_shares(DEFAULT_ORDERS, [Fraction(int(r), int(raw.sum()) + 1) for r in raw])


@settings(max_examples=40, deadline=None)
@given(
    cap=log_uniform(0.1, 20.0),
    delta=log_uniform(1e-10, 1e-3),
    kind=shares_for,
    seed=st.integers(0, 1000),
    requests=st.lists(mechanism_values, min_size=1, max_size=6),
)
def test_admitted_histories_never_report_above_the_cap(
    cap: float, delta: float, kind: str, seed: int, requests: list[mechanisms.Mechanism]
) -> None:
    privacy_filter = MemberFilter(cap, delta, make_shares(kind, cap, delta, seed))
    # Σ δ_α ≤ δ exactly (the shares are rationals; δ_α rounds down), except that the legacy
    # uniform δ/|Λ| rounds to nearest, kept bit for bit: within half an ulp per order.
    assert sum(privacy_filter.shares.weights, Fraction(0)) <= 1
    slack = Fraction(2**-53) if kind == "uniform" else Fraction(0)
    assert sum(Fraction(d) for d in privacy_filter.deltas()) <= Fraction(delta) * (1 + slack)
    costs = [history_of(privacy_filter, [r]) for r in requests]
    curve, pure = np.zeros(privacy_filter.orders.size), PureTotal()
    refusals = 0
    for attempt in range(300):
        cost, cost_pure = costs[attempt % len(costs)]
        if privacy_filter.admits(curve + cost, pure + cost_pure):
            curve, pure = curve + cost, pure + cost_pure
            assert privacy_filter.epsilon(curve, pure) <= cap
        else:
            refusals += 1
            # Refused only when no member has room.
            assert np.all(curve + cost > privacy_filter.budgets())
            assert not (pure + cost_pure).is_pure or (pure + cost_pure).epsilon_sum > Fraction(
                repr(cap)
            )
            if refusals == 3:
                break
    assert privacy_filter.epsilon(curve, pure) <= cap


@settings(max_examples=25, deadline=None)
@given(
    cap=log_uniform(0.1, 20.0),
    delta=log_uniform(1e-10, 1e-3),
    kind=shares_for,
    seed=st.integers(0, 1000),
    requests=st.lists(mechanism_values, min_size=1, max_size=4),
)
def test_reported_epsilon_is_dp_accountings_conversion_at_each_members_share(
    cap: float, delta: float, kind: str, seed: int, requests: list[mechanisms.Mechanism]
) -> None:
    privacy_filter = MemberFilter(cap, delta, make_shares(kind, cap, delta, seed))
    curve, pure = history_of(privacy_filter, requests)
    per_member = []
    for alpha, rho, d in zip(privacy_filter.orders, curve, privacy_filter.deltas(), strict=True):
        if d > 0.0:
            per_member.append(dpa_rdp.compute_epsilon([alpha], [rho], d)[0])
    independent = min(per_member)
    if pure.is_pure:
        independent = min(independent, float(pure.epsilon_sum))
    decision = privacy_filter.decide(curve, pure)
    assert decision.epsilon == pytest.approx(independent, rel=1e-12, abs=1e-15)
    # Never below the independent figure by more than rounding of the exact pure sum.
    assert decision.epsilon >= independent * (1 - 1e-15)
    if decision.member == Member("pure_sum"):
        assert pure.is_pure
    elif decision.member is not None:
        assert decision.member.order in privacy_filter.shares.orders


@pytest.mark.parametrize("cap", [0.05, 0.5, 1.0, 3.0, 8.0, 50.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-7])
@pytest.mark.parametrize("kind", ["default", "explicit"])
def test_each_budget_converts_back_to_the_cap_at_its_own_share(
    cap: float, delta: float, kind: str
) -> None:
    privacy_filter = MemberFilter(cap, delta, make_shares(kind, cap, delta, 7))
    for alpha, budget, d in zip(
        privacy_filter.orders, privacy_filter.budgets(), privacy_filter.deltas(), strict=True
    ):
        if d == 0.0:
            assert budget == -math.inf
            continue
        if budget < 0:
            continue
        at_budget = dpa_rdp.compute_epsilon([alpha], [budget], d)[0]
        assert cap - 1e-7 * max(1.0, cap) <= at_budget <= cap
        over = budget + 1e-6 * max(1.0, budget)
        assert dpa_rdp.compute_epsilon([alpha], [over], d)[0] > cap


@settings(max_examples=60, deadline=None)
@given(
    cap=log_uniform(0.01, 50.0),
    delta=log_uniform(1e-12, 1e-2),
    requests=st.lists(mechanism_values, min_size=0, max_size=5),
)
def test_uniform_profile_reproduces_the_legacy_filter_bit_for_bit(
    cap: float, delta: float, requests: list[mechanisms.Mechanism]
) -> None:
    legacy = Filter(cap, delta)
    members = MemberFilter(cap, delta, uniform_shares())
    np.testing.assert_array_equal(members.budgets(), legacy.budgets())
    curve = sum((m.rdp() for m in requests), np.zeros(DEFAULT_ORDERS.size))
    # Exact units as the service stores them, then back: the service's figures.
    stored = exact.to_curve(exact.to_units(curve))
    pure = sum((pure_total(m) for m in requests), PureTotal())
    for total in (curve, stored, stored * 3.0):
        assert members.epsilon(total, pure) == legacy.epsilon(total)
        assert members.admits(total, pure) == legacy.admits(total)


def test_ten_laplace_releases_of_a_tenth_fill_a_cap_of_one_exactly() -> None:
    privacy_filter = MemberFilter(1.0, 1e-5, default_shares(1.0, 1e-5))
    release = mechanisms.Laplace(calibrate.laplace_scale(0.1))
    cost = release.rdp(privacy_filter.orders)
    curve, pure = np.zeros(privacy_filter.orders.size), PureTotal()
    for count in range(1, 11):
        assert privacy_filter.admits(curve + cost, pure + pure_total(release))
        curve, pure = curve + cost, pure + pure_total(release)
        decision = privacy_filter.decide(curve, pure)
        assert decision.epsilon == pytest.approx(count / 10, abs=1e-15)
        assert decision.member == Member("pure_sum")
    assert privacy_filter.epsilon(curve, pure) == 1.0
    assert pure.epsilon_sum == 1
    assert not privacy_filter.admits(curve + cost, pure + pure_total(release))
    # Generic pure releases declared as 0.1 count as the decimal 1/10 too.
    declared = sum((pure_total(mechanisms.PureDP(0.1)) for _ in range(10)), PureTotal())
    assert declared.epsilon_sum == 1


def test_a_non_pure_mechanism_ends_the_pure_member_and_a_released_hold_restores_it() -> None:
    privacy_filter = MemberFilter(1.0, 1e-5, default_shares(1.0, 1e-5))
    laplace = pure_total(mechanisms.Laplace(10.0)).times(5)
    hold = pure_total(mechanisms.SubsampledGaussian(0.01, 2.0, 100)).times(3)
    curve = mechanisms.Laplace(10.0, 5).rdp(privacy_filter.orders)
    assert privacy_filter.decide(curve, laplace).epsilon == 0.5
    pending = laplace + hold
    assert pending.epsilon() == math.inf
    decided = privacy_filter.decide(curve, pending).member
    assert decided is not None and decided.kind == "rdp"
    assert pending - hold == laplace
    assert PureTotal.from_text((pending).to_text()) == pending
    assert PureTotal.from_text("1/10") == PureTotal(Fraction(1, 10))
    with pytest.raises(ValueError):
        PureTotal.from_text("0.1")
    with pytest.raises(ValueError):
        laplace - hold


def test_decimal_ceiling_never_reports_below_the_exact_sum() -> None:
    assert decimal_ceiling(Fraction(3, 10)) == 0.3
    assert decimal_ceiling(Fraction(1, 3)) >= 1 / 3
    assert Fraction(repr(decimal_ceiling(Fraction(1, 3)))) >= Fraction(1, 3)
    just_above = Fraction(1, 10) + Fraction(1, 10**30)
    assert Fraction(repr(decimal_ceiling(just_above))) >= just_above


def test_shares_round_trip_and_refuse_more_than_delta() -> None:
    shares = default_shares(3.0, 1e-5)
    assert Shares.from_params(shares.params()) == shares
    assert sum(shares.weights) == 1
    heavy = max(shares.weights)
    assert heavy == Fraction(17, 20)
    with pytest.raises(ValueError, match="more than 1"):
        explicit_shares([2.0, 4.0], ["1/2", "2/3"])
    with pytest.raises(ValueError):
        Shares.from_params({"profile": "uniform", "orders": [2.0], "weights": ["x"]})


def test_fit_remaining_gives_the_smallest_sigma_the_filter_admits() -> None:
    q, steps, epochs, delta = 0.01, 100, 10, 1e-5
    privacy_filter = MemberFilter(2.0, delta, default_shares(2.0, delta))
    grid = tuple(privacy_filter.orders)
    posted = exact.to_units(mechanisms.SubsampledGaussian(0.02, 1.5, 300).rdp(grid))
    pending = exact.to_units(mechanisms.Gaussian(8.0, 2).rdp(grid))
    total = exact.add(posted, pending)
    sigma = calibrate.fit_remaining(privacy_filter, total, q, steps, epochs)

    def admitted(s: float) -> bool:
        epoch = exact.to_units(mechanisms.SubsampledGaussian(q, s, steps).rdp(grid))
        plan = [u * epochs for u in epoch]
        return privacy_filter.admits(exact.to_curve(exact.add(total, plan)), PureTotal(impure=1))

    assert admitted(sigma)
    assert not admitted(sigma * (1 - 2e-4))
    assert calibrate.sigma_that_fits(privacy_filter, total, q, steps, epochs) == sigma
    # Holds matter: with more pending, the plan needs more noise.
    more = exact.add(total, exact.to_units(mechanisms.Gaussian(4.0).rdp(grid)))
    assert calibrate.fit_remaining(privacy_filter, more, q, steps, epochs) > sigma


def test_fit_remaining_refuses_a_full_dataset() -> None:
    privacy_filter = MemberFilter(1.0, 1e-5, default_shares(1.0, 1e-5))
    full = exact.to_units(mechanisms.Gaussian(0.5).rdp(tuple(privacy_filter.orders)))
    assert calibrate.sigma_that_fits(privacy_filter, full, 0.01, 100, 10) is None
    with pytest.raises(ValueError, match="cannot fit"):
        calibrate.fit_remaining(privacy_filter, full, 0.01, 100, 10)


def test_mnist_plan_that_fills_a_cap_of_three_is_within_a_percent_of_opacus() -> None:
    """q = 256/60000, 235 steps per epoch × 60 epochs (14100 steps), δ = 1e-5."""
    opacus_utils = pytest.importorskip("opacus.accountants.utils")
    q, delta = 256 / 60000, 1e-5
    privacy_filter = MemberFilter(3.0, delta, default_shares(3.0, delta))
    sigma = calibrate.fit_remaining(privacy_filter, [0] * privacy_filter.orders.size, q, 235, 60)
    plan = mechanisms.SubsampledGaussian(q, sigma, 235).rdp(privacy_filter.orders) * 60
    assert privacy_filter.admits(plan, PureTotal(impure=1))
    opacus_sigma = opacus_utils.get_noise_multiplier(
        target_epsilon=3.0,
        target_delta=delta,
        sample_rate=q,
        steps=14100,
        accountant="rdp",
        epsilon_tolerance=1e-4,
    )
    assert sigma <= 1.01 * opacus_sigma
    # The uniform filter needs ~10 % more noise for the same plan.
    uniform = MemberFilter(3.0, delta, uniform_shares())
    assert calibrate.fit_remaining(uniform, [0] * 35, q, 235, 60) > 1.09 * opacus_sigma
    assert rdp.to_epsilon(plan, delta, privacy_filter.orders)[0] <= 3.0


@pytest.mark.parametrize("cap", [0.5, 3.0, 8.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_first_admission_shares_follow_the_first_requests_shape(cap: float, delta: float) -> None:
    """19/20 of δ where the history the first request announces converts best, 1/20 evenly over
    the other orders of DEFAULT_ORDERS: repeats of a request with its σ (scale-free: an epoch
    and its run agree); for a plan that fills, the plan brought to the cap (σ-free); releases
    and pure ε-DP the Gaussian order; a cap of 0 still gets shares."""
    heavy = Fraction(19, 20)
    grid = CALIBRATION_ORDERS

    def split(shares: Shares) -> float:
        assert sum(shares.weights, Fraction(0)) == 1 and shares.pure_sum
        top = max(range(len(shares.weights)), key=shares.weights.__getitem__)
        assert shares.weights[top] == heavy
        thin = {w for i, w in enumerate(shares.weights) if i != top}
        assert thin == {
            (1 - heavy) / (len(DEFAULT_ORDERS) - (shares.orders[top] in DEFAULT_ORDERS))
        }
        return shares.orders[top]

    q, steps = 256 / 50000, 5880
    fill = plan_order(cap, delta, q, steps, share=heavy)
    for sigma in (0.6, 1.0, 4.0):
        plan = mechanisms.SubsampledGaussian(q, sigma, steps)
        assert split(first_admission_shares(cap, delta, plan, fill=True)) == fill
        repeated = split(first_admission_shares(cap, delta, plan))
        assert repeated == shape_order(cap, delta, plan.rdp(grid), grid, heavy)
        epoch = mechanisms.SubsampledGaussian(q, sigma, 196)
        assert split(first_admission_shares(cap, delta, epoch)) == repeated
    gaussian_order = heavy_order(cap, delta, share=heavy)
    for release in (mechanisms.Gaussian(3.0), mechanisms.Laplace(10.0), mechanisms.PureDP(0.1)):
        assert split(first_admission_shares(cap, delta, release)) == gaussian_order
    # The bent CIFAR plan and the Gaussian shape part ways at large caps (docs/accounting.md
    # §3.1): that is what the profile is for.
    if cap == 8.0:
        assert fill < gaussian_order
    assert split(first_admission_shares(0.0, delta, mechanisms.Gaussian(3.0))) == 512.0
