"""PLD ε of one DP-SGD plan: our `accountant.pld` against dp_accounting's PLD and Opacus' PRV.

    .venv/bin/python -m bench.pld [--repeats N] [--baseline-repeats M]

For each plan it prints one Markdown row: the ε each computes at δ and the time it takes,
ours the median of N cold runs (memo cleared) and one warm (memoised) call, each baseline
the median of M runs, all after one warm-up call each (imports excluded):
dp_accounting's `PLDAccountant` (value_discretization_interval 1e-4, the published PLD
column's setting) and Opacus' `PRVAccountant` (eps_error 0.01, its default; it reports its
upper bound). The RDP ε of the same plan (`accountant.calibrate`) is shown
for scale. A baseline that is not installed is shown as "-". Goal (issue 12): well under
1 s a plan, within ~1 % of dp_accounting.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from accountant import calibrate, pld


@dataclass(frozen=True)
class Plan:
    """One DP-SGD plan whose ε is shown."""

    name: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float


PLANS = [
    Plan("MNIST, 60 epochs", 256 / 60000, 1.1, 14063, 1e-5),
    Plan("MNIST, 45 epochs, σ 0.7", 256 / 60000, 0.7, 10547, 1e-5),
    Plan("CIFAR-like, 30 epochs", 256 / 50000, 1.0, 5850, 1e-5),
    Plan("q = 0.04, 2,250 steps", 0.04, 1.5, 2250, 1e-5),
]


def median_time(compute: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(ε, median seconds) of `repeats` runs of `compute`."""
    times, value = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        value = compute()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def ours(plan: Plan) -> float:
    """Our PLD ε, computed afresh (the memo is cleared so the cost is the real one)."""
    pld._plan_epsilon.cache_clear()  # the bench measures the cold cost on purpose
    return pld.dp_sgd_epsilon(plan.sample_rate, plan.noise_multiplier, plan.steps, plan.delta)


def dp_accounting_pld(plan: Plan) -> float | None:
    """dp_accounting's PLD ε at discretisation 1e-4, or None if it is not installed."""
    try:
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant
    except ImportError:
        return None
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_event.PoissonSampledDpEvent(
        plan.sample_rate, dp_event.GaussianDpEvent(plan.noise_multiplier)
    )
    accountant.compose(event, plan.steps)
    return float(accountant.get_epsilon(plan.delta))


def opacus_prv(plan: Plan) -> float | None:
    """Opacus' PRV ε (its upper bound at eps_error 0.01), or None if it is not installed."""
    try:
        from opacus.accountants import PRVAccountant
    except ImportError:
        return None
    accountant = PRVAccountant()
    accountant.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(plan.delta))


def zero_if_none(compute: Callable[[Plan], float | None], plan: Plan) -> float:
    """`compute(plan)`, 0.0 standing for a baseline that is not installed."""
    return compute(plan) or 0.0


def cell(value: float | None, seconds: float) -> tuple[str, str]:
    """(ε, ms) cells, '-' for a baseline that is not installed."""
    if value is None:
        return "-", "-"
    return f"{value:.4f}", f"{seconds * 1000:.0f}"


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="cold runs of ours per plan")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="runs of each baseline")
    args = parser.parse_args()
    # Imports (torch for Opacus: seconds) and first-call set-up are not a plan's cost.
    warm_up = Plan("warm-up", 0.01, 1.0, 10, 1e-5)
    for compute in (ours, dp_accounting_pld, opacus_prv):
        compute(warm_up)
    print(f"Python {platform.python_version()}, {platform.machine()}")
    print()
    print(
        "| plan | RDP ε | ours ε | ours ms | memoised ms | dp_accounting PLD ε | ms "
        "| Opacus PRV ε | ms | ours − dp_accounting ε | time ÷ ours: dp_accounting, Opacus |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for plan in PLANS:
        rdp = calibrate.dp_sgd_epsilon(
            plan.noise_multiplier, plan.delta, plan.sample_rate, plan.steps
        )
        eps, seconds = median_time(functools.partial(ours, plan), args.repeats)
        start = time.perf_counter()
        pld.dp_sgd_epsilon(plan.sample_rate, plan.noise_multiplier, plan.steps, plan.delta)
        warm = time.perf_counter() - start
        dpa, dpa_s = median_time(
            functools.partial(zero_if_none, dp_accounting_pld, plan), args.baseline_repeats
        )
        prv, prv_s = median_time(
            functools.partial(zero_if_none, opacus_prv, plan), args.baseline_repeats
        )
        dpa_cells = cell(dpa or None, dpa_s)
        prv_cells = cell(prv or None, prv_s)
        gap = f"{eps - dpa:+.1e}" if dpa else "-"
        speed = ", ".join(
            f"{t / seconds:.0f}×" if v else "-" for v, t in ((dpa, dpa_s), (prv, prv_s))
        )
        print(
            f"| {plan.name} | {rdp:.4f} | {eps:.4f} | {seconds * 1000:.0f} | "
            f"{warm * 1000:.3f} | {dpa_cells[0]} | {dpa_cells[1]} | {prv_cells[0]} | "
            f"{prv_cells[1]} | {gap} | {speed} |"
        )


if __name__ == "__main__":
    main()
