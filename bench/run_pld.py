"""What a run's PLD ε costs a plan admission, against a plan of a shape already seen.

    PYTHONPATH=. .venv/bin/python -m bench.run_pld [--shapes N]

The real app in process on a temporary SQLite file. For each of N new plan shapes (MNIST-like,
a new σ each, so nothing is memoised) it times: the POST of the plan (its PLD ε computed before
the lock), the time that POST's write transaction was open (the dataset's lock), then the POST
of a second plan of the same shape (memoised: the baseline). Then a `fit_remaining` plan (no
PLD in its admission) and its first GET (which computes and stores it) and second GET (stored).
Prints medians in ms and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.storage import migrate
from service.storage.database import Database

ADMIN_KEY = "bench-admin-key-0123456789"
SHAPE = {"sample_rate": 256 / 60000, "steps_per_epoch": 235}


class _LockTimer:
    """Times every write transaction of the app (where a dataset is locked)."""

    def __init__(self) -> None:
        self.spans: list[float] = []
        self._write = Database.write

    def install(self) -> None:
        write = self._write
        spans = self.spans

        @contextmanager
        def timed(database: Database) -> Iterator[Any]:
            with write(database) as session:
                started = time.perf_counter()
                yield session
                spans.append(time.perf_counter() - started)

        setattr(Database, "write", timed)  # noqa: B010 - a bench's instrument, undone below

    def uninstall(self) -> None:
        setattr(Database, "write", self._write)  # noqa: B010


def _ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=5)
    args = parser.parse_args()
    timer = _LockTimer()
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{Path(directory) / 'ledger.db'}"
        database = Database(url)
        migrate.upgrade(database.write_engine)
        database.dispose()
        settings = Settings(database_url=url, admin_key=ADMIN_KEY, log_level="warning")
        with TestClient(create_app(settings)) as client:
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

            def post(path: str, body: Any) -> tuple[float, Any]:
                started = time.perf_counter()
                answer = client.post(path, json=body, headers=headers)
                elapsed = time.perf_counter() - started
                assert answer.status_code in (200, 201), answer.text
                return elapsed, answer.json()

            def get(path: str) -> float:
                started = time.perf_counter()
                answer = client.get(path, headers=headers)
                assert answer.status_code == 200, answer.text
                return time.perf_counter() - started

            post("/v1/datasets", {"id": "d", "epsilon_cap": 1e4, "delta": 1e-5})
            runs = "/v1/datasets/d/runs"
            post(runs, {**SHAPE, "epochs": 60, "noise_multiplier": 5.0})  # warm-up
            timer.install()
            cold, cold_lock, warm, warm_lock = [], [], [], []
            fit, first_get, second_get = [], [], []
            for i in range(args.shapes):
                plan = {**SHAPE, "epochs": 60, "noise_multiplier": 1.1 + 0.01 * i}
                timer.spans.clear()
                elapsed, run = post(runs, plan)
                assert run["epsilon_pld"] is not None
                cold.append(elapsed)
                cold_lock.append(sum(timer.spans))
                timer.spans.clear()
                elapsed, _ = post(runs, plan)
                warm.append(elapsed)
                warm_lock.append(sum(timer.spans))
                # A cap of 3 on a fresh dataset: σ ≈ 1.02, a new shape each time (epochs vary).
                post("/v1/datasets", {"id": f"f{i}", "epsilon_cap": 3.0, "delta": 1e-5})
                fitted = {**SHAPE, "epochs": 60 - i, "fit_remaining": True}
                elapsed, run = post(f"/v1/datasets/f{i}/runs", fitted)
                assert run["epsilon_pld"] is None
                fit.append(elapsed)
                first_get.append(get(f"/v1/runs/{run['id']}"))
                second_get.append(get(f"/v1/runs/{run['id']}"))
            timer.uninstall()
    base = _ms(warm)
    print(f"{args.shapes} new shapes, medians (ms); baseline: a plan of a shape already seen")
    print("| call | ms | ÷ baseline | write transaction open, ms |")
    print("|---|---|---|---|")
    print(f"| plan, shape already seen (baseline) | {base:.1f} | 1.0 | {_ms(warm_lock):.1f} |")
    print(
        f"| plan, new shape (PLD cold, before the lock) | {_ms(cold):.1f} | "
        f"{_ms(cold) / base:.1f} | {_ms(cold_lock):.1f} |"
    )
    print(f"| fit_remaining plan (no PLD) | {_ms(fit):.1f} | {_ms(fit) / base:.1f} | - |")
    print(
        f"| its first GET (computes, stores) | {_ms(first_get):.1f} | "
        f"{_ms(first_get) / base:.1f} | - |"
    )
    print(f"| its second GET (stored) | {_ms(second_get):.1f} | {_ms(second_get) / base:.1f} | - |")


if __name__ == "__main__":
    main()
