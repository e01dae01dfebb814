"""The cap filter made of members, each with a share of δ fixed when the dataset is created.

A dataset's filter is (epsilon_cap, δ, Λ, w): an order grid Λ and a share
w_α ≥ 0 of δ per order (Σ w_α ≤ 1, exact rationals). Its members are
- *RDP at α* for every α with w_α > 0 (Feldman & Zrnic 2021, Thm. 3.1;
  Lécuyer 2021): budget B_α = the largest ρ with (α, ρ)-RDP ⇒
  (epsilon_cap, w_α·δ)-DP under Balle et al. 2020, Prop. 12, shaded by _SAFETY;
  admits while total(α) ≤ B_α;
- *sum of pure ε* (basic composition; Rogers, Roth, Ullman, Vadhan 2016,
  Thm. 3.6 with δ = 0), share 0: admits while every mechanism in the history
  is pure ε-DP and their ε sum is ≤ epsilon_cap, in exact rational arithmetic.

A request is admitted iff **some** member admits the whole history with it
(posted + pending + request). The reported ε is the minimum over members of
each member's ε at its own share, and `decide` names the member that gives it.

Why it is valid (fully adaptive composition; docs/accounting.md §3 has the
full proof). Fix the members in an order (pure sum first, then RDP by
ascending α). Posted charges only grow and holds only cover what may still be
posted, so every admitted request was admitted by a member that, at that
moment, had room for everything posted and pending. At the end of an
interaction take the first member M_i that kept every posted charge within its
budget; these events partition the outcome space. On the part of M_i the
interaction's outputs coincide with those of M_i run alone as a filter over
posted charges only, the analyst simulating the ledger's other admission
decisions from the public transcript; M_i never halts on that part, and such
a filter is valid: (epsilon_cap, δ_i)-DP with δ_i = w_i·δ (0 for the pure
member). Summing the δ_i over the parts gives
(epsilon_cap, Σ δ_i)-DP ⊆ (epsilon_cap, δ)-DP. The shares must be fixed before
any output: shares that depend on outputs would make the partition itself
data-dependent and the sum argument fails.

Exactness. Pure ε values are fractions.Fraction: a Laplace scale b (a float,
hence a dyadic rational) is exactly Δ/b-DP, so it is charged 1/Fraction(b);
a declared ε of a generic pure mechanism is the decimal its shortest repr
spells (Fraction(repr(ε))), the value the service calibrates the mechanism to.
The cap is compared as Fraction(repr(epsilon_cap)). Sums and differences are
exact, so 10 releases of ε = 0.1 fill a cap of 1 exactly and report 1.0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from accountant import _checks
from accountant._checks import FloatArray
from accountant.mechanisms import Laplace, Mechanism, PureDP, SubsampledGaussian
from accountant.orders import DEFAULT_ORDERS, SHARE_CANDIDATE_ORDERS
from accountant.rdp import Orders, conversion_offset

__all__ = [
    "Decision",
    "Member",
    "MemberFilter",
    "PureTotal",
    "Shares",
    "decimal_ceiling",
    "default_shares",
    "explicit_shares",
    "first_admission_shares",
    "heavy_order",
    "plan_order",
    "pure_total",
    "shape_order",
    "uniform_shares",
]

# As in accountant.filter: budgets shaded down so rounding never reports above the cap.
_SAFETY = 1e-9
# The plan hint (`default_shares(..., plan=...)`, the service's dp_sgd profile): this much of δ
# on the plan's own best order; the rest spread evenly over DEFAULT_ORDERS.
DEFAULT_HEAVY_SHARE = Fraction(9, 10)
# The first_admission profile: the first request says which shape the dataset spends in, so the
# filter bets more of δ on its order (docs/accounting.md §3.1, bench/tightness.py's sweep).
FIRST_ADMISSION_SHARE = Fraction(19, 20)
# The default profile (no plan known), chosen by bench/tightness.py's shape sweep and a
# minimax search (docs/accounting.md §3.1): 4/5 of δ on the Gaussian-shaped history's best
# order α*; a band below it, where DP-SGD curves that bend (small σ: few steps, small q) convert
# best, at (α − 1) = (α* − 1)·e^offset; what is left spread thin over DEFAULT_ORDERS. Exact
# rationals, so the stored weights are reproducible from (cap, δ).
GAUSSIAN_SHARE = Fraction(17, 20)
BAND_SHARES: tuple[tuple[float, Fraction], ...] = (
    (-0.2, Fraction(1, 40)),
    (-0.45, Fraction(11, 100)),
)
THIN_SHARE = 1 - GAUSSIAN_SHARE - sum((w for _, w in BAND_SHARES), Fraction(0))

Profile = Literal["uniform", "default", "explicit"]


def decimal_ceiling(value: Fraction) -> float:
    """The smallest float whose shortest decimal (repr) is ≥ `value`; +inf past the floats.

    Reported pure-ε sums use it: the figure a user reads is never below the exact sum,
    and a sum equal to a cap written as a float reports exactly that float.
    """
    try:
        result = float(value)
    except OverflowError:
        return math.inf
    while Fraction(repr(result)) < value:
        result = math.nextafter(result, math.inf)
    return result


@dataclass(frozen=True, slots=True)
class PureTotal:
    """The pure-DP part of a cost or a total: its exact ε sum and how many non-pure items.

    `impure` counts mechanisms that are not pure ε-DP (each hold or charge of one counts
    once per copy), so releasing a hold subtracts exactly; the total is pure iff it is 0.
    """

    epsilon_sum: Fraction = Fraction(0)
    impure: int = 0

    def __post_init__(self) -> None:
        if self.epsilon_sum < 0 or self.impure < 0:
            raise ValueError("a pure total cannot go negative: the costs are inconsistent")

    @property
    def is_pure(self) -> bool:
        """Whether every mechanism counted is pure ε-DP."""
        return self.impure == 0

    def __add__(self, other: PureTotal) -> PureTotal:
        return PureTotal(self.epsilon_sum + other.epsilon_sum, self.impure + other.impure)

    def __sub__(self, other: PureTotal) -> PureTotal:
        return PureTotal(self.epsilon_sum - other.epsilon_sum, self.impure - other.impure)

    def times(self, copies: int) -> PureTotal:
        """`copies` of this cost (e.g. a run's hold = epochs × one epoch)."""
        k = _checks.count("copies", copies)
        return PureTotal(self.epsilon_sum * k, self.impure * k)

    def epsilon(self) -> float:
        """The pure member's ε: the exact sum (rounded up in decimal), +inf if not pure."""
        return decimal_ceiling(self.epsilon_sum) if self.is_pure else math.inf

    def to_text(self) -> str:
        """Compact exact form for storage: "num/den" or "num/den;impure" (impure > 0)."""
        text = f"{self.epsilon_sum.numerator}/{self.epsilon_sum.denominator}"
        return text if self.impure == 0 else f"{text};{self.impure}"

    @classmethod
    def from_text(cls, text: str) -> PureTotal:
        """Inverse of `to_text`; ValueError on anything else."""
        fraction, _, impure = text.partition(";")
        num, slash, den = fraction.partition("/")
        if not slash or not all(part.isdigit() for part in (num, den, impure or "0")):
            raise ValueError(f"not a stored pure total: {text!r}")
        return cls(Fraction(int(num), int(den)), int(impure or "0"))


def pure_total(mechanism: Mechanism) -> PureTotal:
    """The pure-DP part of one mechanism's cost (its exact ε, or one non-pure item)."""
    if isinstance(mechanism, Laplace):
        # Laplace with scale b on L1 sensitivity 1 is exactly (1/b)-DP (Dwork et al. 2006).
        return PureTotal(Fraction(mechanism.steps) / Fraction(mechanism.scale))
    if isinstance(mechanism, PureDP):
        return PureTotal(mechanism.steps * Fraction(repr(mechanism.epsilon)))
    return PureTotal(Fraction(0), 1)


@dataclass(frozen=True, slots=True)
class Shares:
    """The RDP members of a filter: orders Λ and their shares w_α of δ, fixed at creation."""

    profile: Profile
    orders: tuple[float, ...]
    weights: tuple[Fraction, ...]
    # The pure-sum member (share 0). Off only for the legacy uniform filter, so datasets
    # created before it keep exactly their figures.
    pure_sum: bool = True
    # Computed once: the filter caches key on the shares, and hashing ~38 Fractions is not free.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_hash", hash((self.profile, self.orders, self.weights, self.pure_sum))
        )
        grid = _checks.orders(self.orders)
        if len(self.weights) != grid.size:
            raise ValueError(f"shares: {len(self.weights)} weights for {grid.size} orders")
        if any(not isinstance(w, Fraction) or w < 0 for w in self.weights):
            raise ValueError("shares: every weight must be a Fraction ≥ 0")
        if sum(self.weights, Fraction(0)) > 1:
            raise ValueError("shares: the weights sum to more than 1 (more than δ)")
        if self.profile not in ("uniform", "default", "explicit"):
            raise ValueError(f"shares: unknown profile {self.profile!r}")

    def params(self) -> dict[str, Any]:
        """Plain dict for storage (weights as "num/den")."""
        return {
            "profile": self.profile,
            "orders": list(self.orders),
            "weights": [f"{w.numerator}/{w.denominator}" for w in self.weights],
            "pure_sum": self.pure_sum,
        }

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Shares:
        """Inverse of `params`; ValueError on anything malformed."""
        try:
            weights = tuple(Fraction(str(w)) for w in params["weights"])
            orders = tuple(float(a) for a in params["orders"])
            pure_sum = params["pure_sum"]
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"bad shares: {exc!r}") from None
        if not isinstance(pure_sum, bool):
            raise ValueError("bad shares: pure_sum must be true or false")
        return cls(params["profile"], orders, weights, pure_sum)


def uniform_shares(orders: Orders = DEFAULT_ORDERS, *, pure_sum: bool = False) -> Shares:
    """δ/|Λ| on every order: without the pure-sum member, exactly `accountant.Filter`."""
    grid = tuple(float(a) for a in _checks.orders(orders))
    return Shares("uniform", grid, (Fraction(1, len(grid)),) * len(grid), pure_sum)


def explicit_shares(orders: Orders, weights: Sequence[Fraction | int | str]) -> Shares:
    """Shares an admin chose (weights as Fractions, ints or "num/den" strings)."""
    grid = tuple(float(a) for a in _checks.orders(orders))
    return Shares("explicit", grid, tuple(Fraction(w) for w in weights))


def heavy_order(
    epsilon_cap: float,
    delta: float,
    candidates: Orders = SHARE_CANDIDATE_ORDERS,
    share: Fraction = DEFAULT_HEAVY_SHARE,
) -> float:
    """The order at which a Gaussian-shaped curve ρ(α) = c·α reaching the cap converts best.

    For each α the largest c with c·α + offset(δ_h, α) ≤ cap is (cap − offset)/α
    (offset: Balle et al. 2020, Prop. 12; δ_h = share·δ); the history that reaches the
    cap has the largest such c, at the returned α.
    """
    cap = _checks.positive("epsilon_cap", epsilon_cap)
    d = _checks.open_probability("delta", delta)
    grid = _checks.orders(candidates)
    heavy_delta = float(Fraction(d) * share)
    scale = (cap - conversion_offset(heavy_delta, grid)) / grid
    return float(grid[int(np.argmax(scale))])


def plan_order(
    epsilon_cap: float,
    delta: float,
    sample_rate: float,
    steps: int,
    candidates: Orders = SHARE_CANDIDATE_ORDERS,
    share: Fraction = DEFAULT_HEAVY_SHARE,
) -> float:
    """The order at which the DP-SGD plan (sample_rate, steps) that reaches the cap converts best.

    For datasets whose admin knows the run shape: subsampled-Gaussian curves bend
    (MTZ 2019), so at caps ≳ 3 their best order sits below the Gaussian-shaped one
    (e.g. 6.6 against 7.6 for q = 256/50000, 5880 steps, ε = 3, δ = 1e-5).
    """
    # Imported here: calibrate imports this module for fit_remaining.
    from accountant.calibrate import noise_multiplier
    from accountant.rdp import subsampled_gaussian, to_epsilon

    heavy_delta = float(Fraction(delta) * share)
    grid = _checks.orders(candidates)
    sigma = noise_multiplier(epsilon_cap, heavy_delta, sample_rate, steps, grid)
    curve = subsampled_gaussian(sample_rate, sigma, steps, grid)
    return to_epsilon(curve, heavy_delta, grid)[1]


def _heavy_and_thin(alpha: float, heavy: Fraction = DEFAULT_HEAVY_SHARE) -> Shares:
    """`heavy` of δ on α, the rest spread evenly over the other orders of DEFAULT_ORDERS."""
    thin = [float(a) for a in DEFAULT_ORDERS if float(a) != alpha]
    grid = sorted([*thin, alpha])
    thin_weight = (1 - heavy) / len(thin)
    return Shares("default", tuple(grid), tuple(heavy if a == alpha else thin_weight for a in grid))


def shape_order(
    epsilon_cap: float,
    delta: float,
    curve: npt.ArrayLike,
    candidates: Orders = SHARE_CANDIDATE_ORDERS,
    share: Fraction = FIRST_ADMISSION_SHARE,
) -> float:
    """The order at which repeats of a mechanism with RDP curve `curve` (on `candidates`) that
    reach the cap convert best.

    RDP composes by addition, so k repeats cost k·curve(α). For each α the largest k with
    k·curve(α) + offset(δ_h, α) ≤ cap is (cap − offset)/curve(α) (offset: Balle et al. 2020,
    Prop. 12; δ_h = share·δ); the history that reaches the cap has the largest such k, at the
    returned α. Scaling the curve does not move it: one epoch and its whole run, one release
    and a thousand, give the same order. For c·α (a Gaussian release) it is `heavy_order`.
    Where no order can hold any multiple of the curve (0 or infinite everywhere, or the offset
    alone above the cap), the Gaussian-shaped order.
    """
    cap = _checks.positive("epsilon_cap", epsilon_cap)
    d = _checks.open_probability("delta", delta)
    grid = _checks.orders(candidates)
    values = np.asarray(curve, dtype=np.float64)
    if values.shape != grid.shape or np.any(np.isnan(values)) or np.any(values < 0):
        raise ValueError("curve: one value ≥ 0 per candidate order, no NaN")
    room = cap - conversion_offset(float(Fraction(d) * share), grid)
    usable = (room > 0) & (values > 0) & np.isfinite(values)
    if not np.any(usable):
        return heavy_order(cap, d, grid, share)
    scale = np.where(usable, room / np.where(usable, values, 1.0), -np.inf)
    return float(grid[int(np.argmax(scale))])


def first_admission_shares(
    epsilon_cap: float, delta: float, mechanism: Mechanism, *, fill: bool = False
) -> Shares:
    """The shares a dataset of the first_admission profile fixes at its first admission.

    19/20 of δ on the order where the history the first admitted request announces converts
    best when it reaches the cap, 1/20 spread over the other orders of DEFAULT_ORDERS:
    - a request with its own σ (a run's whole plan, a release): more of the same, k repeats of
      its curve (`shape_order`) — a one-epoch smoke run at the real run's σ announces the real
      run exactly;
    - `fill` (a DP-SGD plan with fit_remaining, whose σ is chosen to fill the cap): the plan of
      that sample rate and step count whose σ brings it to the cap (`plan_order`), known
      before σ is fitted; at the fitted σ this is `shape_order`'s answer (k = 1);
    - pure ε-DP (Laplace, PureDP): summed exactly by the pure-sum member, so the RDP shares go
      where Gaussian-family mechanisms that may follow convert best (`heavy_order`).
    A cap of 0 (nothing can be admitted): the largest candidate order. The mechanism is the
    analyst's first request, chosen before any output of the dataset, so the shares are fixed
    before any output, as the filter's proof needs (docs/accounting.md §3.1, "Shares fixed at
    the first admission").
    """
    return _heavy_and_thin(
        _first_admission_order(epsilon_cap, delta, mechanism, fill), FIRST_ADMISSION_SHARE
    )


@functools.lru_cache(maxsize=1024)
def _first_admission_order(
    epsilon_cap: float, delta: float, mechanism: Mechanism, fill: bool
) -> float:
    if epsilon_cap <= 0:
        return float(SHARE_CANDIDATE_ORDERS[-1])
    share = FIRST_ADMISSION_SHARE
    if pure_total(mechanism).is_pure:
        return heavy_order(epsilon_cap, delta, share=share)
    if fill and isinstance(mechanism, SubsampledGaussian):
        return _fill_order(epsilon_cap, delta, mechanism.sample_rate, mechanism.steps)
    grid = _checks.orders(SHARE_CANDIDATE_ORDERS)
    return shape_order(epsilon_cap, delta, mechanism.rdp(grid), grid, share)


@functools.lru_cache(maxsize=1024)
def _fill_order(epsilon_cap: float, delta: float, sample_rate: float, steps: int) -> float:
    """`plan_order` at the first_admission share, memoised on the plan's shape (σ does not
    enter): it calibrates a plan, milliseconds, up to ~1 s at extreme caps."""
    share = FIRST_ADMISSION_SHARE
    try:
        return plan_order(epsilon_cap, delta, sample_rate, steps, share=share)
    except ValueError:  # no σ in range brings this plan to the cap
        return heavy_order(epsilon_cap, delta, share=share)


def default_shares(
    epsilon_cap: float, delta: float, plan: tuple[float, int] | None = None
) -> Shares:
    """The default profile fixed at creation: 17/20 of δ on α*, a band below it, the rest thin
    over DEFAULT_ORDERS.

    α* = `heavy_order(cap, δ, share=GAUSSIAN_SHARE)`: where a Gaussian-shaped history that
    reaches the cap converts best. The band (`BAND_SHARES`) sits at α − 1 = (α* − 1)·e^−0.2
    and (α* − 1)·e^−0.45 (nearest SHARE_CANDIDATE_ORDERS in log(α − 1)): DP-SGD runs of
    few steps or small σ bend, and the run that reaches the cap converts best down to about
    (α* − 1)/2 (bench/tightness.py, shape sweep). Orders that coincide merge their shares.
    Grid = DEFAULT_ORDERS ∪ {α*, band}; Σ w = 1 exactly.

    With `plan` = (sample_rate, steps) (the service's dp_sgd profile, unchanged): 9/10 of δ
    on `plan_order(cap, δ, *plan)`, 1/10 spread over the other orders of DEFAULT_ORDERS.
    """
    if plan is not None:
        return _heavy_and_thin(plan_order(epsilon_cap, delta, *plan))
    alpha = heavy_order(epsilon_cap, delta, share=GAUSSIAN_SHARE)
    heavy: dict[float, Fraction] = {alpha: GAUSSIAN_SHARE}
    candidates = _checks.orders(SHARE_CANDIDATE_ORDERS)
    log_excess = np.log(candidates - 1.0)
    for offset, share in BAND_SHARES:
        target = math.log(alpha - 1.0) + offset
        order = float(candidates[int(np.argmin(np.abs(log_excess - target)))])
        heavy[order] = heavy.get(order, Fraction(0)) + share
    thin = [float(a) for a in DEFAULT_ORDERS if float(a) not in heavy]
    thin_weight = THIN_SHARE / len(thin)
    grid = sorted([*thin, *heavy])
    return Shares("default", tuple(grid), tuple(heavy.get(a, thin_weight) for a in grid))


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a filter: ("rdp", α) or ("pure_sum", None)."""

    kind: Literal["rdp", "pure_sum"]
    order: float | None = None

    def label(self) -> str:
        """A phrase a trainer reads on the dataset."""
        return "sum of pure ε" if self.kind == "pure_sum" else f"RDP at α = {self.order:g}"


PURE_SUM = Member("pure_sum")


@dataclass(frozen=True, slots=True)
class Decision:
    """The reported ε of a total and the member that gives it (None when nothing is spent)."""

    epsilon: float
    member: Member | None


class MemberFilter:
    """An (epsilon_cap, δ) privacy filter of RDP members with fixed shares and a pure-sum member."""

    __slots__ = (
        "_budgets",
        "_cap_exact",
        "_deltas",
        "_offsets",
        "delta",
        "epsilon_cap",
        "orders",
        "shares",
    )

    def __init__(self, epsilon_cap: float, delta: float, shares: Shares) -> None:
        self.epsilon_cap = _checks.non_negative("epsilon_cap", epsilon_cap)
        self.delta = _checks.open_probability("delta", delta)
        self.shares = shares
        self.orders = np.asarray(shares.orders, dtype=np.float64)
        self.orders.setflags(write=False)
        self._cap_exact = Fraction(repr(self.epsilon_cap))
        # δ_α = δ·num/den in floats: for uniform shares (1/|Λ|) that is δ/|Λ| bit for bit, the
        # legacy Filter's figure. Other profiles round down, so Σ δ_α ≤ δ holds exactly.
        deltas = []
        for w in shares.weights:
            d = self.delta * w.numerator / w.denominator
            if shares.profile != "uniform":
                while d > 0.0 and Fraction(d) > Fraction(self.delta) * w:
                    d = math.nextafter(d, 0.0)
            deltas.append(d)
        self._deltas = np.asarray(deltas, dtype=np.float64)
        member = self._deltas > 0.0
        offsets = np.full(self.orders.size, np.inf)
        # Per order with math.log of its own δ_α: the same operations as conversion_offset.
        log_delta = np.array([math.log(d) for d in self._deltas[member]])
        grid = self.orders[member]
        offsets[member] = np.log1p(-1.0 / grid) - (log_delta + np.log(grid)) / (grid - 1.0)
        self._offsets = offsets
        self._offsets.setflags(write=False)
        exact = self.epsilon_cap - offsets
        budgets = exact - _SAFETY * np.maximum(1.0, np.abs(exact))
        self._budgets = np.where(member, budgets, -np.inf)
        self._budgets.setflags(write=False)
        self._deltas.setflags(write=False)

    def budgets(self) -> FloatArray:
        """Per-order budgets B_α (-inf for orders with no share, negative where none fits)."""
        return self._budgets.copy()

    def deltas(self) -> FloatArray:
        """Per-order δ_α = w_α·δ (0 where an order is not a member)."""
        return self._deltas.copy()

    def admits(self, total_rdp: npt.ArrayLike, pure: PureTotal) -> bool:
        """Whether a history with composed curve `total_rdp` and pure part `pure` stays within."""
        total = _checks.rdp_curve(total_rdp, self.orders)
        if self.shares.pure_sum and pure.is_pure and pure.epsilon_sum <= self._cap_exact:
            return True
        return bool(np.any(total <= self._budgets))

    def decide(self, total_rdp: npt.ArrayLike, pure: PureTotal) -> Decision:
        """The reported ε (minimum over members at their shares) and the member that gives it."""
        total = _checks.rdp_curve(total_rdp, self.orders)
        with np.errstate(over="ignore", invalid="ignore"):
            per_order = total + self._offsets
        # KL ≤ ρ and Bretagnolle–Huber: (0, δ_α)-DP where ρ < −log(1 − δ_α²) (rdp.to_epsilon).
        kl_zero = self._deltas * self._deltas + np.expm1(-total) > 0.0
        per_order = np.where(kl_zero, 0.0, per_order)
        best = int(np.argmin(per_order))
        rdp_epsilon = max(0.0, float(per_order[best]))
        if self.shares.pure_sum and pure.is_pure:
            pure_epsilon = pure.epsilon()
            if pure_epsilon <= rdp_epsilon:
                return Decision(pure_epsilon, PURE_SUM if pure.epsilon_sum else None)
        member = Member("rdp", float(self.orders[best])) if math.isfinite(rdp_epsilon) else None
        return Decision(rdp_epsilon, member)

    def epsilon(self, total_rdp: npt.ArrayLike, pure: PureTotal) -> float:
        """The reported ε of a history: `decide(...).epsilon`."""
        return self.decide(total_rdp, pure).epsilon

    def __repr__(self) -> str:
        cap, delta, profile = self.epsilon_cap, self.delta, self.shares.profile
        return f"MemberFilter(epsilon_cap={cap!r}, delta={delta!r}, shares={profile!r})"
