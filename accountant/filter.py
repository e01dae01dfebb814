"""The cap filter: admit a request only while the dataset stays within its cap.

Guarantee. Let Λ be the order grid and δ' = δ/|Λ|. For each order α let
B_α be the largest ρ such that (α, ρ)-RDP implies (epsilon_cap, δ')-DP under
the conversion of Balle et al. 2020 (Prop. 12). A request with cost curve c
is admitted iff, for **some** α ∈ Λ, total(α) + c(α) ≤ B_α. Then the whole
interaction with the dataset is (epsilon_cap, δ)-DP, even when every request
is chosen adaptively after seeing the outcomes of earlier ones.

Why it is valid. For a single fixed order α, halting before the summed RDP
exceeds B_α is a valid Rényi filter (Feldman & Zrnic 2021, Thm. 3.1; Lécuyer
2021): the interaction is (α, B_α)-RDP, hence (epsilon_cap, δ')-DP. With many
orders, split the outcomes by the first order that is still within budget at
the end; on each part the interaction coincides with the single-order filter
of that order, so each part is (epsilon_cap, δ')-DP, and the |Λ| parts add
up to (epsilon_cap, δ)-DP (a union bound). This holds for any mix of
mechanisms. PLD/PRV accountants give no valid filter in general, so they are
never used to enforce a cap.

The reported ε of a total is the same conversion at δ', so an admitted total
always reports ε ≤ epsilon_cap: "spent" and "admitted" cannot disagree. The
budgets are shaded down by a hair (_SAFETY) so floating-point rounding can
never make an admitted total report more than the cap.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from accountant import _checks
from accountant._checks import FloatArray
from accountant.orders import DEFAULT_ORDERS
from accountant.rdp import Orders, conversion_offset, to_epsilon_unchecked

__all__ = ["Filter"]

_SAFETY = 1e-9


class Filter:
    """An (epsilon_cap, delta) privacy filter over an RDP order grid."""

    __slots__ = ("_budgets", "delta", "delta_per_order", "epsilon_cap", "orders")

    def __init__(self, epsilon_cap: float, delta: float, orders: Orders = DEFAULT_ORDERS) -> None:
        self.epsilon_cap = _checks.non_negative("epsilon_cap", epsilon_cap)
        self.delta = _checks.open_probability("delta", delta)
        self.orders = _checks.orders(orders)
        self.orders.setflags(write=False)
        self.delta_per_order = self.delta / self.orders.size
        exact = self.epsilon_cap - conversion_offset(self.delta_per_order, self.orders)
        self._budgets = exact - _SAFETY * np.maximum(1.0, np.abs(exact))
        self._budgets.setflags(write=False)

    def budgets(self) -> FloatArray:
        """Per-order budgets B_α (negative where an order can never admit anything)."""
        return self._budgets.copy()

    def admits(self, total_rdp: npt.ArrayLike) -> bool:
        """Whether a dataset whose composed curve would be `total_rdp` stays within the cap."""
        total = _checks.rdp_curve(total_rdp, self.orders)
        return bool(np.any(total <= self._budgets))

    def epsilon(self, total_rdp: npt.ArrayLike) -> float:
        """The filter-consistent ε of a composed curve (conversion at δ/|Λ|)."""
        # δ/|Λ| may be below MIN_PROBABILITY (δ itself is not): still a normal float.
        total = _checks.rdp_curve(total_rdp, self.orders)
        return to_epsilon_unchecked(total, self.delta_per_order, self.orders)[0]

    def __repr__(self) -> str:
        cap, delta, size = self.epsilon_cap, self.delta, self.orders.size
        return f"Filter(epsilon_cap={cap!r}, delta={delta!r}, orders={size})"
