"""A budget's reported figures are computed once per state and dropped by every change.

`Budget` keeps its spent and reserved decisions (an admission reports them in its entry and
again in its answer) and carries the reserved one over a charge moved out of a hold, which
leaves posted + pending exactly as they were. Whatever the sequence of holds, charges,
releases and refunds, the kept figures must equal those computed afresh from the same state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from accountant.mechanisms import Gaussian, Laplace, SubsampledGaussian
from accountant.members import PureTotal, default_shares
from service.domain.budget import Budget, StoredShares, member_filter

MECHANISMS = (Laplace(10.0), SubsampledGaussian(0.01, 1.1, 100), Gaussian(8.0, 1))
OPERATIONS = ("hold", "charge_held", "charge", "release", "refund")


def _budget() -> Budget:
    shares = default_shares(10.0, 1e-5)
    zero = [0] * len(shares.orders)
    return Budget(
        filter=member_filter(10.0, 1e-5, shares),
        shares=StoredShares("default", shares),
        orders=shares.orders,
        posted=zero,
        pending=zero,
        pure_posted=PureTotal(),
        pure_pending=PureTotal(),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(OPERATIONS), st.integers(0, len(MECHANISMS) - 1)), max_size=30
    )
)
def test_kept_figures_equal_fresh_ones_after_every_change(steps: list[tuple[str, int]]) -> None:
    budget = _budget()
    held: Counter[int] = Counter()
    posted: Counter[int] = Counter()
    for operation, index in steps:
        cost = budget.cost_of(MECHANISMS[index])
        if operation == "hold":
            budget.hold(cost)
            held[index] += 1
        elif operation == "charge_held" and held[index]:
            budget.charge(cost, from_hold=True)
            held[index] -= 1
            posted[index] += 1
        elif operation == "charge":
            budget.charge(cost, from_hold=False)
            posted[index] += 1
        elif operation == "release" and held[index]:
            budget.release(cost)
            held[index] -= 1
        elif operation == "refund" and posted[index]:
            budget.refund(cost)
            posted[index] -= 1
        fresh = replace(budget, _spent=None, _reserved=None)
        # Read both, so that the next change finds them kept.
        assert budget.spent_decision() == fresh.spent_decision()
        assert budget.epsilon_spent() == fresh.epsilon_spent()
        assert budget.epsilon_reserved() == fresh.epsilon_reserved()
