"""Memoised computations asked for by many requests at once are computed once (memo.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from service.domain import run_pld, runs
from service.domain.memo import memoised


def test_concurrent_first_calls_compute_once_and_other_arguments_are_not_held_up() -> None:
    computed: list[int] = []
    entered = threading.Event()
    release = threading.Event()

    @memoised(maxsize=16)
    def slow(value: int) -> int:
        computed.append(value)
        if value == 1:
            entered.set()
            assert release.wait(10)
        return value * 10

    with ThreadPoolExecutor(max_workers=9) as pool:
        waiting = [pool.submit(slow, 1) for _ in range(8)]
        assert entered.wait(10)
        # Another argument goes through while the first is being computed.
        assert pool.submit(slow, 2).result(timeout=10) == 20
        time.sleep(0.05)  # the other seven callers of 1 are waiting for the first
        release.set()
        assert [future.result(timeout=10) for future in waiting] == [10] * 8
    assert sorted(computed) == [1, 2]  # 1 once, not once per caller
    assert slow(1) == 10 and sorted(computed) == [1, 2]


def test_a_plans_calibration_and_pld_figure_are_computed_once_for_a_burst_of_plans() -> None:
    """A fleet of trainers starting the same plan at once: σ is calibrated, and the plan's PLD
    figure computed, once (each costs tens of milliseconds of CPU)."""
    runs._calibration.cache_clear()
    run_pld.of_plan.cache_clear()
    spec = runs.RunSpec(
        sample_rate=0.0123,
        steps_per_epoch=37,
        epochs=3,
        target_epsilon=1.7,
        noise_multiplier=None,
        sampling="poisson",
        max_grad_norm=1.0,
        name="burst",
        lease_seconds=60,
    )

    def plan() -> float:
        calibration = runs.calibrate_plan(spec, 1e-6)
        mechanism = runs._plan_mechanism(spec, calibration.noise_multiplier, spec.epochs)
        figure = run_pld.of_plan(mechanism, 1e-6)
        return calibration.noise_multiplier + (figure.epsilon or 0.0)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = set(pool.map(lambda _: plan(), range(32)))
    assert len(results) == 1
    assert runs._calibration.cache_info().misses == 1
    assert run_pld.of_plan.cache_info().misses == 1
