"""A dataset's budget state in memory: its member filter, its curves and its pure-ε sums.

A dataset's filter is `accountant.members.MemberFilter` with the shares of δ fixed
when it was created or, for the first_admission profile, by its first admission
(docs/accounting.md §3.1): until then nothing is posted or held, so no figure depends on
them, and the first cost a budget is asked about carries the shares it would fix (`Cost.fixes`)
and is decided with them; holding or charging it fixes them. Its state is the posted (charges) and
pending (holds) RDP curves in exact units, and — when the filter has the pure-sum
member — the exact pure-ε sums of the same two (`PureTotal`: an ε sum and a count of
non-pure items, so releasing a DP-SGD hold subtracts exactly and gives the pure member
back). Datasets created before migration 0004 have uniform shares and no pure-sum
member: their pure sums are None and every figure is the one they always reported.

The conversions are memoised on their exact inputs: an admission asks for the same
figures more than once (its entry, its answer), and every epoch of a run, or release
of one kind, has the same curve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import Any

from accountant import DEFAULT_ORDERS, exact
from accountant.mechanisms import Mechanism
from accountant.members import (
    Decision,
    MemberFilter,
    PureTotal,
    Shares,
    first_admission_shares,
    pure_total,
    uniform_shares,
)
from accountant.rdp import to_epsilon
from service.storage.models import Dataset

Units = list[int]
# The pure part of a cost on a dataset without the pure-sum member: never looked at.
_NO_PURE = PureTotal()


@dataclass(frozen=True)
class Cost:
    """What one hold, charge or release costs: its RDP curve in units and its pure-ε part."""

    units: Units
    pure: PureTotal
    # On a dataset whose shares are not fixed yet: the shares this cost fixes if it is held or
    # charged (its units are on their grid).
    fixes: StoredShares | None = None

    @cached_property
    def text(self) -> str:
        """The units as stored (JSON), encoded once per cost (every epoch of a run is the same
        Cost object: `holds.epoch_cost`)."""
        return dumps_units(self.units)

    def times(self, copies: int) -> Cost:
        """`copies` of this cost (a run's hold is epochs × one epoch)."""
        # Not PureTotal.times: a finished run releases 0 copies of its epoch.
        pure = PureTotal(self.pure.epsilon_sum * copies, self.pure.impure * copies)
        return Cost([copies * unit for unit in self.units], pure, self.fixes)


@dataclass(frozen=True)
class StoredShares:
    """A dataset's shares as stored: the filter's Shares and how the admin chose them.

    `profile` is the admin's choice (first_admission, default, dp_sgd, uniform, explicit);
    the dp_sgd profile is the default split with its heavy order placed for a planned run
    shape (`plan`: sample_rate and steps), so its filter Shares carry the profile "default",
    as do first_admission's once fixed. A first_admission dataset is `unfixed` until its first
    admission: its weights are then empty and `shares` is a stand-in on its grid (uniform) that
    decides no figure (nothing is posted or held; a cost is decided with the shares it fixes).
    `fixed_at_seq` is the entry that fixed them (first_admission only).
    """

    profile: str
    shares: Shares
    plan: dict[str, Any] | None = None
    unfixed: bool = False
    fixed_at_seq: int | None = None

    def to_json(self) -> str:
        """The text stored on the dataset row and in its `dataset_created` entry."""
        return json.dumps(self.public(), separators=(",", ":"))

    def public(self) -> dict[str, Any]:
        """As shown on the dataset and recorded in its first entry (and, for first_admission,
        in the entry that fixed them). A new dict each call; its lists are shared: read only."""
        return dict(self._public)

    @cached_property
    def _public(self) -> dict[str, Any]:
        # Every answer shows the shares: ~36 weights formatted once per shares, not per answer.
        shown = {**self.shares.params(), "profile": self.profile, "plan": self.plan}
        if self.profile == FIRST_ADMISSION:
            shown["fixed_at_seq"] = self.fixed_at_seq
            if self.unfixed:
                shown["weights"] = []
        return shown

    def unfixed_form(self) -> dict[str, Any]:
        """What a first_admission dataset recorded at creation: its grid, no weights yet."""
        return {**self.public(), "weights": [], "fixed_at_seq": None, "orders": list(UNFIXED_GRID)}


FIRST_ADMISSION = "first_admission"
# The grid a first_admission dataset holds its (zero) curves on until its shares are fixed.
UNFIXED_GRID = tuple(float(a) for a in DEFAULT_ORDERS)


def unfixed_shares() -> StoredShares:
    """A new first_admission dataset's shares: none yet, a stand-in on UNFIXED_GRID."""
    return StoredShares(FIRST_ADMISSION, uniform_shares(UNFIXED_GRID, pure_sum=True), unfixed=True)


@lru_cache(maxsize=1024)
def _fixes(epsilon_cap: float, delta: float, mechanism: Mechanism, fill: bool) -> StoredShares:
    shares = first_admission_shares(epsilon_cap, delta, mechanism, fill=fill)
    return StoredShares(FIRST_ADMISSION, _interned(shares))


# One object per distinct Shares: the caches keyed on shares (`member_filter`, the filter's
# decisions) then match by identity instead of comparing ~36 Fractions a lookup, which the
# shares a first admission fixed and the same shares read back from the row would otherwise do.
_INTERNED: dict[Shares, Shares] = {}


def _interned(shares: Shares) -> Shares:
    if len(_INTERNED) >= 4096:
        _INTERNED.clear()
    return _INTERNED.setdefault(shares, shares)


@lru_cache(maxsize=1024)
def loads_shares(text: str) -> StoredShares:
    """A dataset's stored shares (cached: they never change)."""
    stored = json.loads(text)
    profile = stored["profile"]
    if profile == FIRST_ADMISSION and not stored["weights"]:
        return unfixed_shares()
    filter_profile = "default" if profile in ("dp_sgd", FIRST_ADMISSION) else profile
    shares = _interned(Shares.from_params({**stored, "profile": filter_profile}))
    return StoredShares(
        profile, shares, stored.get("plan"), fixed_at_seq=stored.get("fixed_at_seq")
    )


@lru_cache(maxsize=256)
def member_filter(epsilon_cap: float, delta: float, shares: Shares) -> MemberFilter:
    """The dataset's filter (cached: its budgets depend only on cap, δ and shares)."""
    return MemberFilter(epsilon_cap, delta, shares)


@lru_cache(maxsize=1024)
def _units(mechanism: Mechanism, orders: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(exact.to_units(mechanism.rdp(orders)))


@lru_cache(maxsize=2048)
def _decide(filter_: MemberFilter, units: tuple[int, ...], pure: PureTotal) -> Decision:
    return filter_.decide(exact.to_curve(units), pure)


@lru_cache(maxsize=1024)
def _own_epsilon(delta: float, orders: tuple[float, ...], units: tuple[int, ...]) -> float:
    return to_epsilon(exact.to_curve(units), delta, orders)[0]


def dumps_units(units: Units) -> str:
    """Units as stored (JSON)."""
    return json.dumps(units, separators=(",", ":"))


def loads_units(text: str) -> Units:
    """Units from storage."""
    return [int(v) for v in json.loads(text)]


def loads_pure(text: str | None) -> PureTotal | None:
    """A stored pure total (None stays None: no pure-sum member)."""
    return PureTotal.from_text(text) if text is not None else None


def _stored_pure(stored: StoredShares, text: str | None) -> PureTotal | None:
    if not stored.shares.pure_sum:
        return None
    if text is None:
        raise ValueError("the dataset's filter has the pure-sum member but no stored pure sums")
    return PureTotal.from_text(text)


def _plus(total: PureTotal | None, part: PureTotal) -> PureTotal | None:
    return total + part if total is not None else None


def _minus(total: PureTotal | None, part: PureTotal) -> PureTotal | None:
    return total - part if total is not None else None


@dataclass
class Budget:
    """posted (charges) and pending (holds) of one dataset, with its member filter.

    `reported` is (spent, reserved) as of the last stored state: the next entry's
    figures before it.
    """

    filter: MemberFilter
    shares: StoredShares
    orders: tuple[float, ...]
    posted: Units
    pending: Units
    pure_posted: PureTotal | None
    pure_pending: PureTotal | None
    reported: tuple[float, float] | None = field(default=None)
    # The ledger seq this state is as of: a copy kept across one transaction's admissions is
    # current only while the dataset's last seq is still this one (holds.begin).
    seq: int = -1
    # Set when a cost fixed the shares; the next appended entry records them (ledger.append).
    fixing: bool = False
    # The current state's figures, computed once (an admission reports them in its entry and
    # its answer); every change to posted or pending drops the ones it moves.
    _spent: Decision | None = field(default=None, repr=False, compare=False)
    _reserved: Decision | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, dataset: Dataset) -> Budget:
        """The budget of a dataset row."""
        orders = tuple(float(a) for a in json.loads(dataset.orders))
        stored = loads_shares(dataset.shares)
        budget = cls(
            filter=member_filter(dataset.epsilon_cap, dataset.delta, stored.shares),
            shares=stored,
            orders=orders,
            posted=loads_units(dataset.posted_units),
            pending=loads_units(dataset.pending_units),
            pure_posted=_stored_pure(stored, dataset.pure_posted),
            pure_pending=_stored_pure(stored, dataset.pure_pending),
        )
        budget.reported = (budget.epsilon_spent(), budget.epsilon_reserved())
        budget.seq = dataset.last_seq
        return budget

    @property
    def has_pure_sum(self) -> bool:
        """Whether the filter has the pure-sum member (datasets created since 0004)."""
        return self.shares.shares.pure_sum

    def store(self, dataset: Dataset) -> None:
        """Write the curves and pure sums back to the row (and the shares, once fixed)."""
        if self.fixing:
            dataset.shares = self.shares.to_json()
            dataset.orders = json.dumps(list(self.orders))
        dataset.posted_units = dumps_units(self.posted)
        dataset.pending_units = dumps_units(self.pending)
        if self.pure_posted is not None and self.pure_pending is not None:
            dataset.pure_posted = self.pure_posted.to_text()
            dataset.pure_pending = self.pure_pending.to_text()

    def cost_of(
        self, mechanism: Mechanism, shape: Mechanism | None = None, *, fill: bool = False
    ) -> Cost:
        """The mechanism's cost on this dataset: its curve in exact units (rounded up) on the
        dataset's grid and its exact pure-ε part. On a dataset whose shares are not fixed yet,
        `shape` (default: the mechanism; a run's: its whole plan) and `fill` (a plan whose σ
        fills the cap) say which shares it fixes (`members.first_admission_shares`)."""
        if self.shares.unfixed:
            cap, delta = self.filter.epsilon_cap, self.filter.delta
            fixes = _fixes(cap, delta, shape or mechanism, fill)
            return Cost(list(_units(mechanism, fixes.shares.orders)), pure_total(mechanism), fixes)
        return Cost(list(_units(mechanism, self.orders)), pure_total(mechanism))

    def _view(self, cost: Cost) -> tuple[MemberFilter, Units, Units]:
        """The filter, posted and pending a cost is decided against: the dataset's own, or, on
        a dataset whose shares are not fixed yet, those of the shares the cost would fix (on
        their grid; posted and pending are then zero)."""
        if cost.fixes is None or not self.shares.unfixed:
            return self.filter, self.posted, self.pending
        self._check_empty()
        zero = [0] * len(cost.fixes.shares.orders)
        filter_ = member_filter(self.filter.epsilon_cap, self.filter.delta, cost.fixes.shares)
        return filter_, zero, zero

    def _check_empty(self) -> None:
        if any(self.posted) or any(self.pending):
            raise RuntimeError("a dataset whose shares are not fixed has posted or held budget")

    def _fix(self, cost: Cost) -> None:
        """Fix the shares a cost was computed for, if they are not fixed yet."""
        if cost.fixes is None:
            return
        if not self.shares.unfixed:
            if cost.fixes.shares != self.shares.shares:
                raise RuntimeError("a cost computed for shares other than the dataset's")
            return
        self._check_empty()
        self._spent = self._reserved = None
        self.shares = cost.fixes
        self.filter = member_filter(self.filter.epsilon_cap, self.filter.delta, cost.fixes.shares)
        self.orders = cost.fixes.shares.orders
        self.posted = [0] * len(self.orders)
        self.pending = [0] * len(self.orders)
        self.fixing = True

    def settle_shares(self, seq: int) -> None:
        """Record the entry that fixed the shares (called by ledger.append for that entry)."""
        self.shares = replace(self.shares, fixed_at_seq=seq)

    def decided_against(self, cost: Cost) -> tuple[MemberFilter, Units]:
        """The filter a cost is decided with and the curve it adds to (posted + pending)."""
        filter_, posted, pending = self._view(cost)
        return filter_, exact.add(posted, pending)

    def _pure(self, total: PureTotal | None) -> PureTotal:
        return total if total is not None else _NO_PURE

    def _decision(self, units: Units, pure: PureTotal | None) -> Decision:
        return _decide(self.filter, tuple(units), self._pure(pure))

    def _reserved_pure(self) -> PureTotal | None:
        if self.pure_posted is None or self.pure_pending is None:
            return None
        return self.pure_posted + self.pure_pending

    def spent_decision(self) -> Decision:
        """The reported spent ε and the member that gives it (None when nothing is spent)."""
        if self._spent is None:
            self._spent = self._decision(self.posted, self.pure_posted)
        return self._spent

    def epsilon_spent(self) -> float:
        """Filter ε of the posted charges (minimum over members at their shares)."""
        return self.spent_decision().epsilon

    def epsilon_reserved(self) -> float:
        """Filter ε of posted charges plus pending holds."""
        if self._reserved is None:
            total = exact.add(self.posted, self.pending)
            self._reserved = self._decision(total, self._reserved_pure())
        return self._reserved.epsilon

    def _with(self, cost: Cost) -> tuple[MemberFilter, Units, PureTotal | None]:
        filter_, total = self.decided_against(cost)
        return filter_, exact.add(total, cost.units), _plus(self._reserved_pure(), cost.pure)

    def epsilon_with(self, cost: Cost) -> float:
        """Filter ε the dataset would reach with `cost` added."""
        filter_, units, pure = self._with(cost)
        return _decide(filter_, tuple(units), self._pure(pure)).epsilon

    def admits(self, cost: Cost) -> bool:
        """Whether the filter admits `cost` on top of everything posted and pending."""
        filter_, units, pure = self._with(cost)
        return filter_.admits(exact.to_curve(units), self._pure(pure))

    def admits_under_cap(self, epsilon_cap: float) -> bool:
        """Whether the same filter with cap `epsilon_cap` (same shares) admits posted + pending.

        An empty history is within any cap (its ε is 0), even a cap of 0 whose filter admits
        no curve at all.
        """
        if not any(self.posted) and not any(self.pending):
            return True
        lowered = member_filter(epsilon_cap, self.filter.delta, self.shares.shares)
        units = exact.add(self.posted, self.pending)
        return lowered.admits(exact.to_curve(units), self._pure(self._reserved_pure()))

    def own_epsilon(self, cost: Cost) -> float:
        """A cost's own ε at the dataset's δ (not a filter figure): its RDP conversion on the
        dataset's grid, or its exact pure-ε sum where the filter has that member and it is less."""
        orders = cost.fixes.shares.orders if cost.fixes is not None else self.orders
        rdp = _own_epsilon(self.filter.delta, orders, tuple(cost.units))
        return min(rdp, cost.pure.epsilon()) if self.has_pure_sum else rdp

    def entry_pure(self, cost: Cost) -> PureTotal | None:
        """The pure part an entry records (None on a dataset without the pure-sum member)."""
        return cost.pure if self.has_pure_sum else None

    def hold(self, cost: Cost) -> None:
        """Add a hold."""
        self._fix(cost)
        self.pending = exact.add(self.pending, cost.units)
        self.pure_pending = _plus(self.pure_pending, cost.pure)
        self._reserved = None

    def release(self, cost: Cost) -> None:
        """Release (part of) a hold."""
        self.pending = exact.subtract(self.pending, cost.units)
        self.pure_pending = _minus(self.pure_pending, cost.pure)
        self._reserved = None

    def charge(self, cost: Cost, *, from_hold: bool) -> None:
        """Post a charge, moving it out of a hold when it was held."""
        self._fix(cost)
        # Moved out of a hold, a charge leaves posted + pending as they were, exactly (integer
        # units, exact pure sums), and so the reserved figure.
        reserved = self._reserved if from_hold else None
        if from_hold:
            self.release(cost)
        self.posted = exact.add(self.posted, cost.units)
        self.pure_posted = _plus(self.pure_posted, cost.pure)
        self._spent, self._reserved = None, reserved

    def refund(self, cost: Cost) -> None:
        """Subtract a posted charge (a refund, or a void written before migration 0004)."""
        self.posted = exact.subtract(self.posted, cost.units)
        self.pure_posted = _minus(self.pure_posted, cost.pure)
        self._spent = self._reserved = None


def share_of(shares: Shares, member_order: float) -> Fraction:
    """The share of δ an RDP member (its order) holds."""
    return shares.weights[shares.orders.index(member_order)]
