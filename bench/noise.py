"""The service's exact samplers: values noised per second for one 100,000-value release.

    .venv/bin/python -m bench.noise [--values 100000] [--repeats 3]

Beside each figure, in the same run, the float noise the service used to add
(numpy's PCG64 `laplace`/`normal` on float64, not private on a real
computer) as the ceiling the exact samplers are measured against.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from fractions import Fraction
from functools import partial

import numpy as np

from service.domain import noise, samplers


def _best(repeats: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    """Print one Markdown table: values/s for each mechanism, and the ratio to float noise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    values = [float(i % 1000) for i in range(args.values)]
    data = np.asarray(values)
    generator = np.random.default_rng()
    laplace, _ = noise.laplace_plan(1.0, len(values), epsilon=Fraction(1, 10))
    gaussian = noise.gaussian_plan(1.0, len(values), epsilon=1.0, delta=1e-5)

    def float_laplace() -> object:
        return data + generator.laplace(0, 10, data.size)

    def float_gaussian() -> object:
        return data + generator.normal(0, gaussian.noise_scale, data.size)

    cases: list[tuple[str, noise.NoisePlan, Callable[[], object]]] = [
        ("discrete Laplace, ε = 0.1, Δ₁ = 1", laplace, float_laplace),
        ("discrete Gaussian, (1, 1e-5), Δ₂ = 1", gaussian, float_gaussian),
    ]

    variance = Fraction(40) ** 2
    table = samplers.gaussian_table(variance)  # built once per σ (4 ms here), as in the service

    print(f"| {args.values:,} values | exact (values/s) | float numpy (values/s) | ratio |")
    print("|---|---|---|---|")
    for name, plan, ceiling in cases:
        exact = _best(args.repeats, partial(plan.noised, values))
        floats = _best(args.repeats, ceiling)
        rate, ceiling_rate = args.values / exact, args.values / floats
        print(f"| {name} | {rate:,.0f} | {ceiling_rate:,.0f} | {rate / ceiling_rate:.4f} |")
    # Integer counts, σ = 40, no grid (the noisy-argmax regime): both exact samplers, on a
    # release's worth of values and on one batch of 100 ten-class histograms.
    for size in (args.values, 1_000):
        integer_cases: list[tuple[str, Callable[[], object]]] = [
            (
                "rejection (`gaussian_array`)",
                partial(samplers.gaussian_array, samplers.Csprng(), size, variance),
            ),
            ("inversion (`GaussianTable`)", partial(table.draw, samplers.Csprng(), size)),
        ]
        floats = _best(args.repeats, partial(generator.normal, 0, 40.0, size))
        for label, work in integer_cases:
            rate, ceiling_rate = size / _best(args.repeats, work), size / floats
            name = f"discrete Gaussian on integers, σ = 40, {size:,} at a time, {label}"
            print(f"| {name} | {rate:,.0f} | {ceiling_rate:,.0f} | {rate / ceiling_rate:.4f} |")


if __name__ == "__main__":
    main()
