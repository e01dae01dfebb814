"""Lowering a cap under open holds: refused below what is posted and held, so held epochs,
which post without a new admission, can never take the reported ε past the cap."""

from __future__ import annotations

from typing import Any

from tests.service.conftest import Api

EPOCHS = 4
PLAN = {"sample_rate": 0.01, "steps_per_epoch": 100, "epochs": EPOCHS, "noise_multiplier": 1.0}


def _dataset(api: Api) -> dict[str, Any]:
    response = api.get("/v1/datasets/d")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _held_run(api: Api) -> tuple[Api, str]:
    """A dataset with cap 8 and one run of 4 epochs planned, one epoch of it spent."""
    api.create_dataset("d", 8.0)
    trainer = api.as_key(api.new_key("trainer"))
    run = trainer.post("/v1/datasets/d/runs", PLAN)
    assert run.status_code == 201, run.text
    epoch = trainer.post(f"/v1/runs/{run.json()['id']}/epochs")
    assert epoch.status_code == 201, epoch.text
    return trainer, str(run.json()["id"])


def test_a_cap_below_reserved_is_refused_and_changes_nothing(api: Api) -> None:
    trainer, run_id = _held_run(api)
    before = _dataset(api)
    spent, reserved = before["epsilon_spent"], before["epsilon_reserved"]
    assert 0 < spent < reserved < 8.0

    for cap in (reserved * (1 - 1e-6), (spent + reserved) / 2, spent / 2, 0.0):
        refused = api.patch("/v1/datasets/d", {"epsilon_cap": cap, "reason": "tighter"})
        assert refused.status_code == 409, refused.text
        problem = refused.json()
        assert problem["code"] == "cap_below_reserved"
        assert problem["epsilon_cap"] == 8.0 and problem["epsilon_cap_requested"] == cap
        assert problem["epsilon_reserved"] == reserved and problem["epsilon_spent"] == spent
        assert _dataset(api) == before
    assert api.get("/v1/datasets/d/ledger/verify").json()["ok"] is True

    # Just above the reserved figure is allowed, and every held epoch still posts within it.
    cap = reserved * (1 + 1e-6)
    lowered = api.patch("/v1/datasets/d", {"epsilon_cap": cap})
    assert lowered.status_code == 200, lowered.text
    assert lowered.json()["ledger_seq"] == before["ledger_seq"] + 1
    for _ in range(EPOCHS - 1):
        epoch = trainer.post(f"/v1/runs/{run_id}/epochs")
        assert epoch.status_code == 201, epoch.text
    after = _dataset(api)
    assert after["epsilon_spent"] <= after["epsilon_cap"] == cap


def test_after_the_run_is_aborted_the_same_lowering_succeeds(api: Api) -> None:
    trainer, run_id = _held_run(api)
    before = _dataset(api)
    cap = (before["epsilon_spent"] + before["epsilon_reserved"]) / 2
    refused = api.patch("/v1/datasets/d", {"epsilon_cap": cap})
    assert refused.json()["code"] == "cap_below_reserved", refused.text

    assert trainer.post(f"/v1/runs/{run_id}/abort").status_code == 200
    lowered = api.patch("/v1/datasets/d", {"epsilon_cap": cap})
    assert lowered.status_code == 200, lowered.text
    assert lowered.json()["epsilon_cap"] == cap
    assert lowered.json()["epsilon_reserved"] == before["epsilon_spent"] <= cap
    # Raising is never refused, and lowering an empty dataset to 0 is allowed.
    assert api.patch("/v1/datasets/d", {"epsilon_cap": 9.0}).status_code == 200
    api.create_dataset("empty", 1.0)
    assert api.patch("/v1/datasets/empty", {"epsilon_cap": 0.0}).status_code == 200
