"""Shuffle runs over HTTP: every hold, charge and calibration is the substitution bound.

A `sampling: "shuffle"` epoch is one Gaussian step of sensitivity 2C and noise σC, i.e.
Gaussian(σ/2) (docs/accounting.md §1, "Shuffled batches"). The figures are checked against
dp_accounting's RDP accountant, which shares no code with ours.
"""

from __future__ import annotations

from typing import Any

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as ra

from accountant import CALIBRATION_ORDERS, DEFAULT_ORDERS
from service.storage.database import Database
from tests.service.conftest import Api, cached_budget, replay_units

DELTA = 1e-5
FILTER_DELTA = DELTA / len(DEFAULT_ORDERS)  # the filter converts at δ/|Λ| (accounting.md §3)
SIGMA, EPOCHS = 3.0, 4
PLAN = {"sample_rate": 0.02, "steps_per_epoch": 50, "sampling": "shuffle"}


def their_epsilon(
    noise_multiplier: float, count: int, delta: float, orders: Any = DEFAULT_ORDERS
) -> float:
    """dp_accounting's ε of `count` Gaussian mechanisms of std/sensitivity `noise_multiplier`."""
    accountant = ra.RdpAccountant(orders=[float(a) for a in orders])
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), count)
    return float(accountant.get_epsilon(delta))


def _entries(api: Api, dataset_id: str, **params: object) -> list[dict[str, Any]]:
    response = api.get(f"/v1/datasets/{dataset_id}/ledger", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def test_a_shuffle_run_is_held_and_charged_as_one_substitution_per_epoch(
    api: Api, database: Database
) -> None:
    api.create_dataset("d", 50.0, DELTA, shares={"profile": "uniform"})  # figures at δ/|Λ|
    created = api.post("/v1/datasets/d/runs", {**PLAN, "epochs": EPOCHS, "noise_multiplier": SIGMA})
    assert created.status_code == 201, created.text
    run = created.json()
    assert run["sampling"] == "shuffle" and run["noise_multiplier"] == SIGMA
    # The sensitivity is 2C, so the charged noise multiplier is σ/2.
    charged = SIGMA / 2
    assert run["epsilon"] == pytest.approx(
        their_epsilon(charged, EPOCHS, DELTA, CALIBRATION_ORDERS), rel=1e-9
    )
    assert run["epsilon_per_epoch"] == pytest.approx(
        their_epsilon(charged, 1, DELTA, CALIBRATION_ORDERS), rel=1e-9
    )

    (hold,) = _entries(api, "d", kind="hold")
    assert hold["mechanism"] == {"kind": "gaussian", "noise_multiplier": charged, "steps": EPOCHS}
    assert hold["epsilon"] == pytest.approx(their_epsilon(charged, EPOCHS, DELTA), rel=1e-9)
    reserved = their_epsilon(charged, EPOCHS, FILTER_DELTA)
    assert run["dataset"]["epsilon_reserved"] == pytest.approx(reserved, rel=1e-9)

    for epoch in range(1, EPOCHS + 1):
        response = api.post(f"/v1/runs/{run['id']}/epochs")
        assert response.status_code == 201, response.text
        body = response.json()
        # The trainer adds noise of std σ·C: the answer's σ is the plan's, not the charged one.
        assert body["noise_multiplier"] == SIGMA and body["sampling"] == "shuffle"
        spent = their_epsilon(charged, epoch, FILTER_DELTA)
        assert body["dataset"]["epsilon_spent"] == pytest.approx(spent, rel=1e-9)
        assert body["dataset"]["epsilon_reserved"] == pytest.approx(reserved, rel=1e-9)
    charges = _entries(api, "d", kind="charge")
    assert [c["mechanism"] for c in charges] == [
        {"kind": "gaussian", "noise_multiplier": charged, "steps": 1}
    ] * EPOCHS
    for entry in charges:
        assert entry["epsilon"] == pytest.approx(their_epsilon(charged, 1, DELTA), rel=1e-9)
    # The hold is exactly the epochs' charges: nothing is left pending.
    budget = cached_budget(database, "d")
    assert budget.pending == [0] * len(DEFAULT_ORDERS)
    assert budget.posted == hold["units"]
    assert replay_units(_entries(api, "d"), len(DEFAULT_ORDERS)) == (budget.posted, budget.pending)
    assert api.get("/v1/datasets/d/ledger/verify").json()["ok"] is True


def test_shuffle_calibration_meets_its_target_tightly_with_the_charged_mechanism(
    api: Api,
) -> None:
    api.create_dataset("d", 50.0, DELTA, shares={"profile": "uniform"})  # figures at δ/|Λ|
    target, epochs = 2.0, 5
    created = api.post("/v1/datasets/d/runs", {**PLAN, "epochs": epochs, "target_epsilon": target})
    assert created.status_code == 201, created.text
    run = created.json()
    sigma = run["noise_multiplier"]
    # The plan alone meets the target (Opacus' meaning), and a slightly smaller σ does not.
    assert their_epsilon(sigma / 2, epochs, DELTA, CALIBRATION_ORDERS) <= target * (1 + 1e-12)
    smaller = sigma * (1 - 1e-5) / 2
    assert their_epsilon(smaller, epochs, DELTA, CALIBRATION_ORDERS) > target
    assert run["epsilon"] == pytest.approx(target, rel=1e-5) and run["epsilon"] <= target
    # The hold charges the very σ the plan was calibrated with.
    (hold,) = _entries(api, "d", kind="hold")
    assert hold["mechanism"] == {"kind": "gaussian", "noise_multiplier": sigma / 2, "steps": epochs}


def test_a_shuffle_plan_the_substitution_bound_does_not_fit_is_refused(api: Api) -> None:
    # One Gaussian step of σ per epoch would fit this cap; the honest Gaussian(σ/2) does not.
    sigma, epochs = 4.0, 3
    old = their_epsilon(sigma, epochs, FILTER_DELTA)
    honest = their_epsilon(sigma / 2, epochs, FILTER_DELTA)
    api.create_dataset("d", (old + honest) / 2, DELTA)
    refused = api.post("/v1/datasets/d/runs", {**PLAN, "epochs": epochs, "noise_multiplier": sigma})
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "budget_exhausted"
    assert [e["kind"] for e in _entries(api, "d")] == ["dataset_created"]
