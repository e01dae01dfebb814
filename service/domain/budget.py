"""A dataset's budget state in memory: its filter and its posted/pending curves.

The conversions are memoised on their exact integer inputs: an admission asks
for the same figures more than once (for its ledger entry and for its answer),
and every epoch of a run, or release of one kind, has the same curve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from accountant import Filter, exact
from accountant.mechanisms import Mechanism
from accountant.rdp import to_epsilon
from service.storage.models import Dataset

Units = list[int]


@lru_cache(maxsize=256)
def cap_filter(epsilon_cap: float, delta: float, orders: tuple[float, ...]) -> Filter:
    """The dataset's filter (cached: budgets depend only on cap, δ and the grid)."""
    return Filter(epsilon_cap, delta, orders)


@lru_cache(maxsize=1024)
def _units(mechanism: Mechanism, orders: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(exact.to_units(mechanism.rdp(orders)))


@lru_cache(maxsize=1024)
def _filter_epsilon(filter_: Filter, units: tuple[int, ...]) -> float:
    return filter_.epsilon(exact.to_curve(units))


@lru_cache(maxsize=1024)
def _own_epsilon(delta: float, orders: tuple[float, ...], units: tuple[int, ...]) -> float:
    return to_epsilon(exact.to_curve(units), delta, orders)[0]


def dumps_units(units: Units) -> str:
    """Units as stored (JSON)."""
    return json.dumps(units, separators=(",", ":"))


def loads_units(text: str) -> Units:
    """Units from storage."""
    return [int(v) for v in json.loads(text)]


@dataclass
class Budget:
    """posted (charges) and pending (holds) of one dataset, with its filter."""

    filter: Filter
    orders: tuple[float, ...]
    posted: Units
    pending: Units

    @classmethod
    def of(cls, dataset: Dataset) -> Budget:
        """The budget of a dataset row."""
        orders = tuple(float(a) for a in json.loads(dataset.orders))
        return cls(
            filter=cap_filter(dataset.epsilon_cap, dataset.delta, orders),
            orders=orders,
            posted=loads_units(dataset.posted_units),
            pending=loads_units(dataset.pending_units),
        )

    def store(self, dataset: Dataset) -> None:
        """Write the curves back to the row."""
        dataset.posted_units = dumps_units(self.posted)
        dataset.pending_units = dumps_units(self.pending)

    def units_of(self, mechanism: Mechanism) -> Units:
        """The mechanism's curve on this dataset's grid, in exact units (rounded up)."""
        return list(_units(mechanism, self.orders))

    def epsilon_spent(self) -> float:
        """Filter ε of the posted charges."""
        return _filter_epsilon(self.filter, tuple(self.posted))

    def epsilon_reserved(self) -> float:
        """Filter ε of posted charges plus pending holds."""
        return _filter_epsilon(self.filter, tuple(exact.add(self.posted, self.pending)))

    def epsilon_with(self, cost: Units) -> float:
        """Filter ε the dataset would reach with `cost` added."""
        total = exact.add(exact.add(self.posted, self.pending), cost)
        return _filter_epsilon(self.filter, tuple(total))

    def admits(self, cost: Units) -> bool:
        """Whether the filter admits `cost` on top of everything posted and pending."""
        return self.filter.admits(
            exact.to_curve(exact.add(exact.add(self.posted, self.pending), cost))
        )

    def with_cap(self, epsilon_cap: float) -> Budget:
        """The same posted and pending curves under the filter of another cap."""
        delta = self.filter.delta
        return Budget(
            cap_filter(epsilon_cap, delta, self.orders), self.orders, self.posted, self.pending
        )

    def admits_reserved(self) -> bool:
        """Whether the filter admits what is already posted and pending (nothing more).

        An empty history is within any cap (its ε is 0), even a cap of 0 whose filter admits
        no curve at all.
        """
        if not any(self.posted) and not any(self.pending):
            return True
        return self.filter.admits(exact.to_curve(exact.add(self.posted, self.pending)))

    def own_epsilon(self, cost: Units) -> float:
        """A cost's own ε at the dataset's δ (not a filter figure)."""
        return _own_epsilon(self.filter.delta, self.orders, tuple(cost))

    def hold(self, cost: Units) -> None:
        """Add a hold."""
        self.pending = exact.add(self.pending, cost)

    def release(self, cost: Units) -> None:
        """Release (part of) a hold."""
        self.pending = exact.subtract(self.pending, cost)

    def charge(self, cost: Units, *, from_hold: bool) -> None:
        """Post a charge, moving it out of a hold when it was held."""
        if from_hold:
            self.pending = exact.subtract(self.pending, cost)
        self.posted = exact.add(self.posted, cost)

    def void(self, cost: Units) -> None:
        """Compensate a charge."""
        self.posted = exact.subtract(self.posted, cost)
