"""Leases on holds: a lapsed run gives back its unspent hold; epochs renew the lease.

Expiry is lazy (DESIGN.md §3): it happens on read and inside the next admission on the
dataset, so these tests wait by polling the API with a deadline, never by sleeping a lease out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from accountant import exact
from service.domain.budget import Budget
from service.storage.database import Database
from service.storage.models import Dataset, Run
from tests.service.conftest import Api, cached_budget

POLL_SECONDS, DEADLINE_SECONDS = 0.05, 15.0
PLAN: dict[str, Any] = {
    "sample_rate": 0.01,
    "steps_per_epoch": 100,
    "epochs": 4,
    "noise_multiplier": 1.5,
}


def _poll(what: str, probe: Callable[[], httpx.Response | None]) -> httpx.Response:
    """Call `probe` until it returns a response, or fail after the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        response = probe()
        if response is not None:
            return response
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out waiting for {what}")


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _ledger(api: Api, dataset_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/v1/datasets/{dataset_id}/ledger", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def _plan(trainer: Api, dataset_id: str, plan: dict[str, Any]) -> dict[str, Any]:
    response = trainer.post(f"/v1/datasets/{dataset_id}/runs", plan)
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_a_lapsed_lease_gives_back_the_unspent_hold(api: Api, database: Database) -> None:
    api.create_dataset("d", 8.0)
    trainer = api.as_key(api.new_key("trainer", ["d"]))
    run = _plan(trainer, "d", {**PLAN, "lease_seconds": 1})
    epoch = trainer.post(f"/v1/runs/{run['id']}/epochs")
    assert epoch.status_code == 201, epoch.text
    charged = epoch.json()["dataset"]
    assert charged["epsilon_spent"] < charged["epsilon_reserved"]
    assert charged["active_runs"] == 1

    def freed() -> httpx.Response | None:
        response = trainer.get("/v1/datasets/d")
        assert response.status_code == 200, response.text
        lapsed = response.json()["epsilon_reserved"] < charged["epsilon_reserved"]
        return response if lapsed else None

    dataset = _poll("the lapsed hold to be released", freed).json()
    # Only the unspent hold went back: the charged epoch stays spent.
    assert dataset["epsilon_spent"] == charged["epsilon_spent"]
    assert dataset["epsilon_reserved"] == dataset["epsilon_spent"]
    assert dataset["active_runs"] == 0
    assert datetime.now(UTC) >= _moment(epoch.json()["expires_at"])

    entries = _ledger(api, "d")
    hold, charge, released = entries[-3:]
    assert [hold["kind"], charge["kind"], released["kind"]] == ["hold", "charge", "release_hold"]
    assert (released["run_id"], released["actor"]) == (run["id"], "system")
    assert released["details"] == {"reason": "expired", "epochs_released": 3}
    per_epoch = charge["units"]
    assert hold["units"] == [4 * u for u in per_epoch]
    assert released["units"] == [3 * u for u in per_epoch]
    assert released["epsilon_spent_after"] == charge["epsilon_spent_after"]
    assert released["seq"] == dataset["ledger_seq"]

    expired = trainer.get(f"/v1/runs/{run['id']}").json()
    assert (expired["status"], expired["epochs_charged"]) == ("expired", 1)
    for action in ("epochs", "complete", "abort"):
        refused = trainer.post(f"/v1/runs/{run['id']}/{action}")
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "run_not_active"
        assert refused.json()["run_status"] == "expired"
    assert _ledger(api, "d") == entries
    assert api.get("/v1/datasets/d/ledger/verify").json()["ok"] is True

    budget = cached_budget(database, "d")
    assert budget.posted == per_epoch
    assert budget.pending == [0] * len(budget.orders)


def test_each_epoch_renews_the_lease(api: Api) -> None:
    api.create_dataset("d", 8.0)
    trainer = api.as_key(api.new_key("trainer", ["d"]))
    lease = 2
    run = _plan(trainer, "d", {**PLAN, "epochs": 40, "lease_seconds": lease})
    original = _moment(run["expires_at"])
    assert original - _moment(run["created_at"]) == timedelta(seconds=lease)

    # Epochs at intervals well inside the lease, until well past the original expiry.
    previous, epochs = original, 0
    while datetime.now(UTC) < original + timedelta(seconds=1):
        asked = datetime.now(UTC)
        response = trainer.post(f"/v1/runs/{run['id']}/epochs")
        assert response.status_code == 201, response.text
        renewed = _moment(response.json()["expires_at"])
        # Renewed to a full lease from the moment of the epoch.
        assert asked + timedelta(seconds=lease) <= renewed
        assert renewed <= datetime.now(UTC) + timedelta(seconds=lease)
        assert renewed > previous
        previous, epochs = renewed, epochs + 1
        assert epochs < 40
        time.sleep(0.25)

    assert datetime.now(UTC) > original
    current = trainer.get(f"/v1/runs/{run['id']}").json()
    assert current["status"] == "active"
    assert current["epochs_charged"] == epochs
    assert _moment(current["expires_at"]) == previous > original
    assert "release_hold" not in [e["kind"] for e in _ledger(api, "d")]


def test_expiry_happens_inside_the_next_admission(api: Api, database: Database) -> None:
    """A release that fits only without the lapsed hold is admitted, and the ledger says why."""
    # Uniform shares: this short plan is far from the default profile's Gaussian shape, where
    # the default reports more than uniform (docs/accounting.md §3.1, "where it misses").
    api.create_dataset("d", 3.0, shares={"profile": "uniform"})
    trainer = api.as_key(api.new_key("trainer", ["d"]))
    plan = {**PLAN, "epochs": 3, "target_epsilon": 2.0, "lease_seconds": 1}
    del plan["noise_multiplier"]
    run = _plan(trainer, "d", plan)
    release = {"mechanism": "laplace", "epsilon": 1.5}
    refused = trainer.post("/v1/datasets/d/releases", release)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "budget_exhausted"
    seq = run["dataset"]["ledger_seq"]

    # Dry runs rehearse the admission, expiry included, and write nothing: poll with them.
    def admissible() -> httpx.Response | None:
        response = trainer.post("/v1/datasets/d/releases?dry_run=true", release)
        assert response.status_code == 200, response.text
        return response if response.json()["admitted"] else None

    rehearsed = _poll("the release to fit", admissible).json()
    # The rehearsal expired the hold before admitting the release: two entries, no hold left.
    assert rehearsed["ledger_seq"] is None and rehearsed["dataset"]["ledger_seq"] == seq + 2
    assert rehearsed["dataset"]["epsilon_reserved"] == rehearsed["dataset"]["epsilon_spent"]
    assert rehearsed["dataset"]["active_runs"] == 0
    with database.read() as session:
        # Nothing written yet: the lapsed run is still active in the database.
        row = session.get(Run, run["id"])
        assert row is not None and row.status == "active"
        dataset_row = session.get(Dataset, "d")
        assert dataset_row is not None and dataset_row.last_seq == seq
        assert Budget.of(dataset_row).pending != [0] * len(Budget.of(dataset_row).orders)

    admitted = trainer.post("/v1/datasets/d/releases", release)
    assert admitted.status_code == 201, admitted.text
    body = admitted.json()
    assert body["ledger_seq"] == seq + 2
    assert body["dataset"]["epsilon_reserved"] == body["dataset"]["epsilon_spent"] <= 3.0
    assert body["dataset"]["epsilon_spent"] == rehearsed["dataset"]["epsilon_spent"]
    entries = _ledger(api, "d")
    released, charge = entries[-2:]
    assert (released["kind"], released["run_id"], released["actor"]) == (
        "release_hold",
        run["id"],
        "system",
    )
    assert released["details"] == {"reason": "expired", "epochs_released": 3}
    assert released["seq"] == seq + 1
    assert (charge["kind"], charge["release_id"]) == ("charge", body["id"])
    # Both entries were written by the release's own transaction, at one moment.
    assert released["created_at"] == charge["created_at"]
    assert trainer.get(f"/v1/runs/{run['id']}").json()["status"] == "expired"
    assert api.get("/v1/datasets/d/ledger/verify").json()["ok"] is True

    with database.read() as session:
        dataset_row = session.get(Dataset, "d")
        assert dataset_row is not None
        budget = Budget.of(dataset_row)
    assert budget.pending == [0] * len(budget.orders)
    assert budget.posted == exact.add([0] * len(budget.orders), charge["units"])
