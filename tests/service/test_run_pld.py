"""Each run shows its own PLD ε (this run alone, not adaptive) beside its RDP ε.

The figure is `accountant.pld.dp_sgd_epsilon` of the shape the run is charged as, checked here
against the published PLD figure and, for shuffle runs, against the exact Gaussian ε (Balle &
Wang 2018), which shares no code with the PLD. It is never computed while a dataset is locked:
a `fit_remaining` plan shows it on its next read.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from scipy import optimize, special
from sqlalchemy import update

from accountant import pld
from service.app import create_app
from service.domain import run_pld
from service.settings import Settings
from service.storage.database import Database
from service.storage.models import Run
from tests.service.conftest import ADMIN_KEY, Api
from trainer_client import RunRecord

DELTA = 1e-5
# The published MNIST plan: q = 256/60000, σ = 1.1, 14,063 steps (60 epochs), δ = 1e-5, whose
# PLD ε is 2.3818 (dp_accounting; /work/shared/reference/published-figures.md). 14,063 = 49 × 287.
MNIST_Q, MNIST_STEPS = 256 / 60000, 14063
MNIST: dict[str, Any] = {"sample_rate": MNIST_Q, "steps_per_epoch": 287, "epochs": 49}
MNIST_PLD = 2.3818


def _plan(api: Api, dataset_id: str, body: dict[str, Any], **kwargs: Any) -> Any:
    response = api.post(f"/v1/datasets/{dataset_id}/runs", body, **kwargs)
    assert response.status_code == 201, response.text
    return response


def _exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """ε at δ of one Gaussian of std σ/sensitivity, exactly (Balle & Wang 2018, Thm. 8)."""

    def excess(epsilon: float) -> float:
        high = special.ndtr(-epsilon * sigma + 1 / (2 * sigma))
        low = special.ndtr(-epsilon * sigma - 1 / (2 * sigma))
        return float(high - math.exp(epsilon) * low) - delta

    return float(optimize.brentq(excess, 0.0, 100.0, xtol=1e-12))


def test_a_run_shows_its_pld_epsilon_the_published_figure_below_its_rdp_epsilon(api: Api) -> None:
    api.create_dataset("mnist", 8.0, DELTA)
    key = {"Idempotency-Key": "mnist-plan"}
    created = _plan(api, "mnist", {**MNIST, "noise_multiplier": 1.1}, headers=key)
    run = created.json()
    assert run["epsilon_pld"] == pld.dp_sgd_epsilon(MNIST_Q, 1.1, MNIST_STEPS, DELTA)
    assert abs(run["epsilon_pld"] - MNIST_PLD) < 1e-3
    assert run["epsilon_pld_note"] is None
    assert run["epsilon_pld"] < run["epsilon"]  # RDP: 2.5967 for this plan
    # Every answer about the run shows the same figure, and the client reads it.
    shown = api.get(f"/v1/runs/{run['id']}").json()
    (listed,) = api.get("/v1/datasets/mnist/runs").json()["data"]
    assert shown["epsilon_pld"] == listed["epsilon_pld"] == run["epsilon_pld"]
    record = RunRecord.from_json(shown)
    assert record.epsilon_pld == run["epsilon_pld"] and record.epsilon_pld_note is None
    # A replay answers the very bytes of the first answer.
    replayed = api.post("/v1/datasets/mnist/runs", {**MNIST, "noise_multiplier": 1.1}, headers=key)
    assert replayed.status_code == 201 and replayed.content == created.content


def test_a_target_epsilon_plan_shows_the_pld_of_its_calibrated_sigma(api: Api) -> None:
    api.create_dataset("d", 8.0, DELTA)
    plan = {"sample_rate": 0.01, "steps_per_epoch": 100, "epochs": 5, "target_epsilon": 2.0}
    run = _plan(api, "d", plan).json()
    sigma = run["noise_multiplier"]
    assert run["epsilon_pld"] == pld.dp_sgd_epsilon(0.01, sigma, 500, DELTA)
    assert run["epsilon_pld"] < run["epsilon"] <= 2.0


def test_a_shuffle_run_shows_the_pld_of_the_shape_it_is_charged_as(api: Api) -> None:
    """Shuffle: one Gaussian step of σ/2 per epoch (q = 1), never amplified."""
    api.create_dataset("d", 50.0, DELTA)
    plan = {"sample_rate": 0.02, "steps_per_epoch": 50, "epochs": 4, "sampling": "shuffle"}
    run = _plan(api, "d", {**plan, "noise_multiplier": 3.0}).json()
    assert run["epsilon_pld"] == pld.dp_sgd_epsilon(1.0, 1.5, 4, DELTA)
    # Four Gaussians of σ 1.5 are one of σ 1.5/√4 = 0.75: its exact ε, and never below it.
    exact = _exact_gaussian_epsilon(0.75, DELTA)
    assert exact <= run["epsilon_pld"] <= exact * (1 + 1e-3)
    assert run["epsilon_pld"] < run["epsilon"]


def test_a_fit_remaining_plan_gets_its_pld_epsilon_on_the_next_read(api: Api) -> None:
    api.create_dataset("d", 3.0, DELTA)
    key = {"Idempotency-Key": "fit"}
    body = {**MNIST, "fit_remaining": True}
    created = _plan(api, "d", body, headers=key)
    run = created.json()
    assert run["epsilon_pld"] is None and run["epsilon_pld_note"] == run_pld.PENDING_NOTE
    assert RunRecord.from_json(run).epsilon_pld_note == run_pld.PENDING_NOTE
    shown = api.get(f"/v1/runs/{run['id']}").json()
    sigma = run["noise_multiplier"]
    assert shown["epsilon_pld"] == pld.dp_sgd_epsilon(MNIST_Q, sigma, MNIST_STEPS, DELTA)
    assert shown["epsilon_pld_note"] is None
    assert shown["epsilon_pld"] < shown["epsilon"]
    # The replay still answers the stored body (pending), byte for byte.
    replayed = api.post("/v1/datasets/d/runs", body, headers=key)
    assert replayed.status_code == 201 and replayed.content == created.content
    (listed,) = api.get("/v1/datasets/d/runs").json()["data"]
    assert listed["epsilon_pld"] == shown["epsilon_pld"]


def test_runs_without_a_figure_get_it_on_a_listing_and_keep_it(
    api: Api, database: Database
) -> None:
    """Runs stored before migration 0006 (both columns NULL) are filled on their next read."""
    api.create_dataset("d", 50.0, DELTA)
    ids = [
        _plan(api, "d", {**MNIST, "epochs": 2, "noise_multiplier": s}).json()["id"]
        for s in (1.3, 1.7)
    ]
    with database.write() as session:
        session.execute(update(Run).values(epsilon_pld=None, epsilon_pld_note=None))
    listed = api.get("/v1/datasets/d/runs").json()["data"]
    assert [r["epsilon_pld"] for r in listed] == [
        pld.dp_sgd_epsilon(MNIST_Q, s, 287 * 2, DELTA) for s in (1.3, 1.7)
    ]
    with database.read() as session:
        kept = {run.id: run.epsilon_pld for run in session.query(Run)}
    assert kept == {r["id"]: r["epsilon_pld"] for r in listed} and set(kept) == set(ids)


def test_a_plan_the_pld_cannot_compute_is_admitted_and_says_why(api: Api) -> None:
    """δ below the PLD's 1e-10: the run is planned as ever, its PLD ε null with the reason."""
    api.create_dataset("d", 20.0, 1e-12)
    run = _plan(api, "d", {**MNIST, "epochs": 2, "noise_multiplier": 1.1}).json()
    assert run["epsilon_pld"] is None
    assert run["epsilon_pld_note"].startswith(run_pld.REFUSED_PREFIX)
    assert "delta must be at least" in run["epsilon_pld_note"]
    assert api.get(f"/v1/runs/{run['id']}").json()["epsilon_pld_note"] == run["epsilon_pld_note"]


@pytest.fixture
def pld_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Every call of the PLD accountant, each as whether a write transaction (the only place a
    dataset is locked) was open at the time."""
    open_writes = [0]
    guard = threading.Lock()
    calls: list[bool] = []

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        @contextmanager
        def wrapper(self: Database) -> Iterator[Any]:
            with original(self) as session:
                with guard:
                    open_writes[0] += 1
                try:
                    yield session
                finally:
                    with guard:
                        open_writes[0] -= 1

        return wrapper

    monkeypatch.setattr(Database, "write", counted(Database.write))
    monkeypatch.setattr(Database, "rehearsal", counted(Database.rehearsal))
    original_pld = pld.dp_sgd_epsilon

    def spy(*args: Any, **kwargs: Any) -> float:
        with guard:
            calls.append(open_writes[0] > 0)
        return original_pld(*args, **kwargs)

    monkeypatch.setattr(pld, "dp_sgd_epsilon", spy)
    run_pld.of_plan.cache_clear()  # so that every new shape reaches the accountant
    yield calls
    run_pld.of_plan.cache_clear()


def test_no_admission_computes_the_pld_while_the_dataset_is_locked(
    pld_calls: list[bool], migrated_url: str
) -> None:
    settings = Settings(database_url=migrated_url, admin_key=ADMIN_KEY)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, ADMIN_KEY)
        api.create_dataset("d", 8.0, DELTA)
        given = {**MNIST, "epochs": 3, "noise_multiplier": 1.2}
        preview = api.post("/v1/datasets/d/runs", given, params={"dry_run": "true"})
        assert preview.status_code == 200 and preview.json()["epsilon_pld"] is not None
        planned = _plan(api, "d", given).json()
        assert len(pld_calls) == 1  # the dry run's; the plan's own shape was memoised
        fitted = _plan(api, "d", {**MNIST, "epochs": 2, "fit_remaining": True}).json()
        assert fitted["epsilon_pld"] is None and len(pld_calls) == 1  # not in the admission
        assert api.get(f"/v1/runs/{fitted['id']}").json()["epsilon_pld"] is not None
        assert len(pld_calls) == 2
        completed = api.post(f"/v1/runs/{planned['id']}/complete")
        assert completed.status_code == 200
        assert completed.json()["epsilon_pld"] == planned["epsilon_pld"]
    assert pld_calls == [False, False]
