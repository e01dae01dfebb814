"""How tight is the cap filter? Uniform shares against the default profiles, in one run.

    .venv/bin/python -m bench.tightness [--quick] [--prv] [--sweep-only]

For each workload and δ it prints one Markdown row: the cap, the same sequence's
non-adaptive RDP ε at the full δ on dp_accounting's dense default grid (our curves,
dp_accounting's `compute_epsilon`: the baseline), its PLD ε (dp_accounting, discretisation
1e-3, this sequence alone) and Opacus' RDP ε (and PRV with --prv, ~7 s a plan); then the
ledger's reported ε with uniform shares (δ/35 each), with the `default` profile (fixed at
creation from the cap and δ) and with `first_admission` (the profile a dataset gets when none
is named: fixed by its first request, a run's whole plan or the first release), at the cap
and partway; how much of the workload the cap admits under each (runs or releases; for one
run, the σ of a plan that fills the empty cap) against what non-adaptive RDP allows; and
whether the goal holds for first_admission: everything whose non-adaptive RDP ε is ≤ cap/1.01
is admitted (for one run: the filling σ ≤ 1.01 × RDP's and ≤ the σ of RDP ε = cap/1.01),
pure-DP sums exactly, and, for both profiles, never a report below the exact ε where one is
known (Gaussian releases: Balle & Wang 2018) or below min(PLD, RDP).

Then the *shape sweep*: DP-SGD plans q ∈ {1e-3, 1e-2, 0.1, 1} × steps ∈ {1, 10, 300, 3000,
30000} (q = 1: plain Gaussian) and the MNIST/CIFAR runs, caps 0.5/1/3/8, δ 1e-5/1e-7: the σ
that fills the empty cap over the σ non-adaptive RDP needs at the full δ (dense grid) under
uniform shares, the previous default (9/10 on one order), the default, the plan hint and
first_admission; and the short runs that the previous default refused (q = 0.01, 300 steps,
RDP ε 1 on caps 1.5 and 1.6, ε 2 on a cap of 3): their reported ε under each.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from accountant import DEFAULT_ORDERS, calibrate, exact, mechanisms, rdp
from accountant.members import (
    MemberFilter,
    PureTotal,
    Shares,
    default_shares,
    first_admission_shares,
    heavy_order,
    pure_total,
    uniform_shares,
)

# dp_accounting's DEFAULT_RDP_ORDERS: the dense grid of the non-adaptive baseline.
DENSE_ORDERS = np.array(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024],
    dtype=np.float64,
)
MNIST = ("MNIST", 256 / 60000, 235, 60)
CIFAR = ("CIFAR", 256 / 50000, 196, 30)


@dataclass(frozen=True)
class Workload:
    """A sequence of identical units (runs or releases) and the cap it is measured under."""

    name: str
    units: list[mechanisms.Mechanism]  # one unit = these mechanisms, in order
    count: int  # units in the workload
    delta: float
    cap: float | None = None  # None: the sequence's own non-adaptive RDP ε
    plan: tuple[float, int, int] | None = None  # (q, steps/epoch, epochs): a fill-σ row
    exact_epsilon: Callable[[int], float] | None = None
    # The first request as the service sees it (a run: its whole plan, whose shape fixes a
    # first_admission dataset's shares); None: the first mechanism.
    first_request: mechanisms.Mechanism | None = None


def rdp_epsilon(history: list[mechanisms.Mechanism], delta: float) -> float:
    """Non-adaptive RDP ε of a fixed sequence at the full δ on the dense grid (dp_accounting)."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_acc

    curve = sum((m.rdp(DENSE_ORDERS) for m in history), np.zeros(DENSE_ORDERS.size))
    return float(rdp_acc.compute_epsilon(DENSE_ORDERS, curve, delta)[0])


def pld_epsilon(history: list[mechanisms.Mechanism], delta: float) -> float:
    """dp_accounting's PLD ε of a fixed sequence (not a filter: this sequence alone)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant as pld

    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    for m in history:
        if isinstance(m, mechanisms.SubsampledGaussian):
            event = dp_accounting.PoissonSampledDpEvent(
                m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
            )
        elif isinstance(m, mechanisms.Gaussian):
            event = dp_accounting.GaussianDpEvent(m.noise_multiplier)
        elif isinstance(m, mechanisms.Laplace):
            event = dp_accounting.LaplaceDpEvent(m.scale)
        else:
            return math.nan
        accountant.compose(event, m.steps)
    return float(accountant.get_epsilon(delta))


def opacus_epsilons(
    history: list[mechanisms.Mechanism], delta: float, prv: bool
) -> tuple[float, float]:
    """Opacus' RDP (and PRV) ε for DP-SGD-only histories; nan where they do not apply."""
    if not all(isinstance(m, mechanisms.SubsampledGaussian) for m in history):
        return math.nan, math.nan
    from opacus.accountants import PRVAccountant, RDPAccountant

    steps = [(m.noise_multiplier, m.sample_rate, m.steps) for m in history]  # type: ignore[union-attr]
    rdp_acc = RDPAccountant()
    rdp_acc.history = list(steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rdp_eps = float(rdp_acc.get_epsilon(delta))
        prv_eps = math.nan
        if prv:
            prv_acc = PRVAccountant()
            prv_acc.history = list(steps)
            prv_eps = float(prv_acc.get_epsilon(delta))
    return rdp_eps, prv_eps


class Ledger:
    """A dataset's posted state on one filter, kept as the service keeps it (exact units)."""

    def __init__(self, privacy_filter: MemberFilter) -> None:
        self.filter = privacy_filter
        self.orders = tuple(float(a) for a in privacy_filter.orders)
        self.units = [0] * len(self.orders)
        self.pure = PureTotal()

    def cost(self, unit: list[mechanisms.Mechanism]) -> tuple[list[int], PureTotal]:
        units = [0] * len(self.orders)
        pure = PureTotal()
        for m in unit:
            units = exact.add(units, exact.to_units(m.rdp(self.orders)))
            pure = pure + pure_total(m)
        return units, pure

    def try_post(self, units: list[int], pure: PureTotal) -> bool:
        total, total_pure = exact.add(self.units, units), self.pure + pure
        if not self.filter.admits(exact.to_curve(total), total_pure):
            return False
        self.units, self.pure = total, total_pure
        return True

    def epsilon(self) -> float:
        return self.filter.epsilon(exact.to_curve(self.units), self.pure)


def run_unit(shape: tuple[str, float, int, int], sigma: float) -> list[mechanisms.Mechanism]:
    """One epoch-by-epoch DP-SGD run, as the service charges it."""
    _, q, steps, epochs = shape
    return [mechanisms.SubsampledGaussian(q, sigma, steps)] * epochs


def run_plan(shape: tuple[str, float, int, int], sigma: float) -> mechanisms.Mechanism:
    """The same run as one plan: what its hold, the service's first admission, is."""
    _, q, steps, epochs = shape
    return mechanisms.SubsampledGaussian(q, sigma, steps * epochs)


def workloads(quick: bool) -> list[Workload]:
    out: list[Workload] = []
    for delta in (1e-5, 1e-7):
        for shape in (MNIST, CIFAR):
            name, q, steps, epochs = shape
            for eps in (0.5, 1.0, 3.0, 8.0) if not quick else (3.0,):
                sigma = calibrate.noise_multiplier(eps, delta, q, steps * epochs, DENSE_ORDERS)
                out.append(
                    Workload(
                        f"{name} run ε={eps:g}",
                        run_unit(shape, sigma),
                        1,
                        delta,
                        cap=eps,
                        plan=(q, steps, epochs),
                        first_request=run_plan(shape, sigma),
                    )
                )
        sigma_1 = calibrate.noise_multiplier(1.0, delta, MNIST[1], 235 * 60, DENSE_ORDERS)
        plan_1 = run_plan(MNIST, sigma_1)
        three = Workload("3 MNIST runs of ε=1", run_unit(MNIST, sigma_1), 3, delta)
        out.append(dataclasses.replace(three, first_request=plan_1))
        g01 = calibrate.gaussian_sigma(0.1, delta)
        run_plus = [*run_unit(MNIST, sigma_1), *[mechanisms.Gaussian(g01)] * 100]
        mixed = Workload("run ε=1 + 100 Gaussian ε=0.1", run_plus, 1, delta)
        out.append(dataclasses.replace(mixed, first_request=plan_1))
        out.append(Workload("10 Laplace ε=0.1", [mechanisms.Laplace(10.0)], 10, delta, cap=1.0))
        g005 = calibrate.gaussian_sigma(0.05, delta)
        out.append(
            Workload(
                "1000 Gaussian ε=0.05",
                [mechanisms.Gaussian(g005)],
                1000,
                delta,
                exact_epsilon=functools.partial(_composed_gaussian_epsilon, g005, delta),
            )
        )
    return out


def measure(work: Workload, prv: bool) -> str:
    history = work.units * work.count
    baseline = rdp_epsilon(history, work.delta)
    cap = work.cap if work.cap is not None else baseline
    pld = pld_epsilon(history, work.delta)
    op_rdp, op_prv = opacus_epsilons(history, work.delta, prv)
    pure_sum = sum((pure_total(m) for m in history), PureTotal())
    # What the first admission fixes: the first unit's first mechanism (a run's epoch has the
    # shape of its whole plan); a fill-σ row fixes them with the σ it fits (below).
    shares = {
        "uniform": uniform_shares(),
        "default": default_shares(cap, work.delta),
        "first": first_admission_shares(cap, work.delta, work.first_request or history[0]),
    }
    reported: dict[str, tuple[float, float]] = {}
    admitted: dict[str, str] = {}
    goal = []
    for label, share in shares.items():
        privacy_filter = MemberFilter(cap, work.delta, share)
        # Reported ε of the whole workload (at the cap) and of its first half (partway),
        # posted without admission checks: what the dataset would show.
        whole = Ledger(privacy_filter)
        half_eps = math.nan
        for index, m in enumerate(history):
            units, pure = whole.cost([m])
            whole.units, whole.pure = exact.add(whole.units, units), whole.pure + pure
            if index + 1 == len(history) // 2:
                half_eps = whole.epsilon()
        reported[label] = (whole.epsilon(), half_eps)
        if work.plan is not None:
            q, steps, epochs = work.plan
            if label == "first":
                fitted = calibrate.first_admission_fit(cap, work.delta, q, steps, epochs)
                assert fitted is not None
                sigma_fill = fitted[0]
            else:
                sigma_fill = calibrate.fit_remaining(
                    privacy_filter, [0] * len(whole.orders), q, steps, epochs
                )
            sigma_rdp = work.units[0].noise_multiplier  # type: ignore[union-attr]
            admitted[label] = f"σ {sigma_fill:.4f} ({sigma_fill / sigma_rdp:.4f}×)"
            if label == "first":
                # Both halves of the goal: the filling σ within 1 % of RDP's, and the plan
                # whose RDP ε is cap/1.01 admitted (its σ at least the filling one).
                sigma_goal = calibrate.noise_multiplier(
                    cap / 1.01, work.delta, q, steps * epochs, DENSE_ORDERS
                )
                goal.append(sigma_fill <= min(1.01 * sigma_rdp, sigma_goal))
        else:
            # Keep posting units (whole units; for one unit, its mechanisms) until refused.
            granular = work.count == 1
            pieces = [[m] for m in history] if granular else [work.units] * (work.count * 3)
            ledger = Ledger(privacy_filter)
            taken = 0
            for unit in pieces:
                if not ledger.try_post(*ledger.cost(unit)):
                    break
                taken += 1
            admitted[label] = f"{taken}"
            if label == "first":
                # Goal: everything whose RDP ε ≤ cap/1.01 is admitted.
                allowed = _rdp_allows(work, cap / 1.01, granular)
                goal.append(taken >= allowed)
    rdp_allows = _rdp_allows(work, cap, work.count == 1) if work.plan is None else None
    if work.plan is not None:
        rdp_col = f"σ {work.units[0].noise_multiplier:.4f}"  # type: ignore[union-attr]
    else:
        rdp_col = f"{rdp_allows}"
    for label in ("default", "first"):  # the validity checks hold for every profile
        at_cap = reported[label][0]
        if pure_sum.is_pure:
            goal.append(at_cap == pure_sum.epsilon())
        if work.exact_epsilon is not None:
            goal.append(at_cap >= work.exact_epsilon(work.count))
        goal.append(at_cap >= min(pld, baseline) - 1e-9 or math.isnan(pld))
    u, d, f = reported["uniform"], reported["default"], reported["first"]
    pure_col = _f(pure_sum.epsilon() if pure_sum.is_pure else math.nan)
    return (
        f"| {work.name} | {work.delta:g} | {cap:.4f} | {baseline:.4f} | {_f(pld)} | "
        f"{_f(op_rdp)} / {_f(op_prv)} | {pure_col} | "
        f"{u[0]:.4f} / {d[0]:.4f} / {f[0]:.4f} | {u[1]:.4f} / {d[1]:.4f} / {f[1]:.4f} | "
        f"{admitted['uniform']} / {admitted['default']} / {admitted['first']} / {rdp_col} | "
        f"{'yes' if all(goal) else 'NO'} |"
    )


def _rdp_allows(work: Workload, cap: float, granular: bool) -> int:
    """How many units (or, for one unit, mechanisms) non-adaptive RDP at the full δ allows."""
    pieces = [[m] for m in work.units * work.count] if granular else [work.units] * (work.count * 3)
    curve = np.zeros(DENSE_ORDERS.size)
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_acc

    for taken, unit in enumerate(pieces):
        step = sum((m.rdp(DENSE_ORDERS) for m in unit), np.zeros(DENSE_ORDERS.size))
        if rdp_acc.compute_epsilon(DENSE_ORDERS, curve + step, work.delta)[0] > cap:
            return taken
        curve = curve + step
    return len(pieces)


def _composed_gaussian_epsilon(sigma: float, delta: float, count: int) -> float:
    """Exact ε of `count` Gaussian releases of std σ: one Gaussian of σ/√count (Balle & Wang)."""
    return calibrate.gaussian_epsilon(sigma / math.sqrt(count), delta)


def previous_default_shares(cap: float, delta: float) -> Shares:
    """The default before the shape sweep: 9/10 of δ on heavy_order(cap, δ), 1/10 thin."""
    alpha = heavy_order(cap, delta, share=Fraction(9, 10))
    thin = [float(a) for a in DEFAULT_ORDERS if float(a) != alpha]
    grid = sorted([*thin, alpha])
    weights = tuple(Fraction(9, 10) if a == alpha else Fraction(1, 10) / len(thin) for a in grid)
    return Shares("default", tuple(grid), weights)


SWEEP_SHAPES = [
    *((q, k) for q in (1e-3, 1e-2, 0.1) for k in (1, 10, 300, 3000, 30000)),
    (1.0, 1),  # plain Gaussian: every step count is the same shape
    (MNIST[1], MNIST[2] * MNIST[3]),
    (CIFAR[1], CIFAR[2] * CIFAR[3]),
]


SWEEP_LABELS = ("uniform", "previous", "default", "hint", "first")


def sweep_profiles(cap: float, delta: float, plan: tuple[float, int]) -> dict[str, Shares]:
    """The filters fixed before the plan's σ is known, for one (cap, δ) and plan shape (the
    sweep adds first_admission's, which the plan's σ fixes)."""
    return {
        "uniform": uniform_shares(),
        "previous": previous_default_shares(cap, delta),
        "default": default_shares(cap, delta),
        "hint": default_shares(cap, delta, plan),
    }


def shape_sweep() -> list[str]:
    """One Markdown row per (δ, cap, shape): fill-σ ratios to non-adaptive RDP's σ."""
    lines = [
        "| δ | cap | q | steps | RDP σ (δ, dense) | fill σ / RDP σ: uniform / previous "
        "/ default / hint / first admission | RDP ε ≤ cap/1.01 admitted (first admission) |",
        "|" + "---|" * 7,
    ]
    worst: dict[str, float] = {}
    worst_vs_uniform = 0.0
    for delta in (1e-5, 1e-7):
        for cap in (0.5, 1.0, 3.0, 8.0):
            for q, steps in SWEEP_SHAPES:
                sigma_rdp = calibrate.noise_multiplier(cap, delta, q, steps, DENSE_ORDERS)
                sigma_goal = calibrate.noise_multiplier(cap / 1.01, delta, q, steps, DENSE_ORDERS)
                ratios = {}
                for label, shares in sweep_profiles(cap, delta, (q, steps)).items():
                    privacy_filter = MemberFilter(cap, delta, shares)
                    fill = calibrate.fit_remaining(
                        privacy_filter, [0] * privacy_filter.orders.size, q, steps, 1
                    )
                    ratios[label] = fill / sigma_rdp
                fitted = calibrate.first_admission_fit(cap, delta, q, steps, 1)
                assert fitted is not None
                ratios["first"] = fitted[0] / sigma_rdp
                for label, ratio in ratios.items():
                    worst[label] = max(worst.get(label, 0.0), ratio)
                worst_vs_uniform = max(worst_vs_uniform, ratios["first"] / ratios["uniform"])
                admitted = ratios["first"] * sigma_rdp <= sigma_goal
                lines.append(
                    f"| {delta:g} | {cap:g} | {q:.4g} | {steps} | {sigma_rdp:.4f} | "
                    + " / ".join(f"{ratios[k]:.4f}" for k in SWEEP_LABELS)
                    + f" | {'yes' if admitted else 'no'} |"
                )
    lines.append("")
    lines.append(
        "worst fill σ / RDP σ: "
        + ", ".join(f"{k} {v:.4f}" for k, v in worst.items())
        + f"; first admission / uniform at most {worst_vs_uniform:.4f}"
    )
    lines.append("")
    lines.append(
        "| short run (q = 0.01, 300 steps) | δ | cap | reported ε: uniform / previous / default "
        "/ hint / first admission | admitted: uniform / previous / default / hint / first "
        "admission |"
    )
    lines.append("|" + "---|" * 5)
    for eps, cap in ((1.0, 1.5), (1.0, 1.6), (2.0, 3.0)):
        delta = 1e-5
        sigma = calibrate.noise_multiplier(eps, delta, 0.01, 300, DENSE_ORDERS)
        reported, admitted_by = [], []
        profiles = list(sweep_profiles(cap, delta, (0.01, 300)).values())
        run = mechanisms.SubsampledGaussian(0.01, sigma, 300)
        for shares in [*profiles, first_admission_shares(cap, delta, run)]:
            privacy_filter = MemberFilter(cap, delta, shares)
            units = exact.to_units(rdp.subsampled_gaussian(0.01, sigma, 300, shares.orders))
            curve, pure = exact.to_curve(units), PureTotal(impure=1)
            reported.append(f"{privacy_filter.epsilon(curve, pure):.4f}")
            admitted_by.append("yes" if privacy_filter.admits(curve, pure) else "NO")
        lines.append(
            f"| RDP ε {eps:g} (σ {sigma:.4f}) | {delta:g} | {cap:g} | "
            f"{' / '.join(reported)} | {' / '.join(admitted_by)} |"
        )
    return lines


def _f(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run per shape (smoke)")
    parser.add_argument("--prv", action="store_true", help="also Opacus' PRV ε (~7 s a plan)")
    parser.add_argument("--sweep-only", action="store_true", help="only the shape sweep")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.sweep_only:
        print("\n".join(shape_sweep()))
        print(f"\n{time.perf_counter() - started:.0f} s")
        return
    print(
        "| workload | δ | cap | RDP ε (δ, dense) | PLD ε | Opacus RDP / PRV | ε sum (pure) "
        "| reported at cap: uniform / default / first admission "
        "| partway (half): uniform / default / first admission "
        "| admitted: uniform / default / first admission / RDP allows | goal |"
    )
    print("|" + "---|" * 11)
    for work in workloads(args.quick):
        print(measure(work, args.prv), flush=True)
    print()
    print("\n".join(shape_sweep()))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
