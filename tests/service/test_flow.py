"""The whole trainer flow over real HTTP against a running server."""

from __future__ import annotations

import httpx
import pytest

from accountant import Filter, calibrate, exact, rdp
from accountant.mechanisms import SubsampledGaussian
from service.domain.budget import Budget, loads_units
from service.storage.database import Database
from service.storage.models import Dataset
from tests.service.conftest import ADMIN_KEY, Api, LiveServer

Q, STEPS, EPOCHS, DELTA = 256 / 60000, 235, 4, 1e-5


def test_trainer_flow(live_server: LiveServer, database: Database) -> None:
    base = live_server()
    with httpx.Client(base_url=base, timeout=30) as http:
        admin = Api(http, ADMIN_KEY)
        # Uniform shares: the figures below are checked against accountant.Filter (the same
        # filter). A short 4-epoch run is off the default profile's Gaussian shape.
        admin.create_dataset("mnist", 4.3, DELTA, shares={"profile": "uniform"})
        trainer = admin.as_key(admin.new_key("trainer", ["mnist"]))
        auditor = admin.as_key(admin.new_key("auditor", ["mnist"]))

        plan = {"sample_rate": Q, "steps_per_epoch": STEPS, "epochs": EPOCHS, "target_epsilon": 3}
        created = trainer.post("/v1/datasets/mnist/runs", plan)
        assert created.status_code == 201, created.text
        run = created.json()
        # σ is the ledger's: the plan alone meets its target (Opacus' meaning), tightly.
        sigma = run["noise_multiplier"]
        steps = STEPS * EPOCHS
        assert calibrate.dp_sgd_epsilon(sigma, DELTA, Q, steps) <= 3.0
        assert calibrate.dp_sgd_epsilon(sigma * (1 - 1e-4), DELTA, Q, steps) > 3.0
        assert run["epsilon"] == pytest.approx(3.0, rel=1e-4)
        held = run["dataset"]["epsilon_reserved"]
        assert run["dataset"]["epsilon_spent"] == 0.0
        assert 3.0 < held <= 4.3  # the filter's figure carries the δ/|Λ| union bound

        # A second run that would not fit is refused at planning time, with the numbers.
        second = trainer.post("/v1/datasets/mnist/runs", plan)
        assert second.status_code == 409
        refusal = second.json()
        assert refusal["code"] == "budget_exhausted"
        assert second.headers["content-type"].startswith("application/problem+json")
        assert refusal["epsilon_cap"] == 4.3
        assert refusal["epsilon_reserved"] == pytest.approx(held)
        assert refusal["epsilon_after"] > 4.3
        assert refusal["epsilon_requested"] > 0

        spent = []
        for epoch in range(1, EPOCHS + 1):
            response = trainer.post(f"/v1/runs/{run['id']}/epochs")
            assert response.status_code == 201, response.text
            body = response.json()
            assert body["epoch"] == epoch
            assert body["noise_multiplier"] == sigma
            assert body["sample_rate"] == Q and body["steps"] == STEPS
            assert body["beyond_plan"] is False
            spent.append(body["dataset"]["epsilon_spent"])
            assert body["dataset"]["epsilon_reserved"] == pytest.approx(held)
        assert spent == sorted(spent) and spent[-1] == pytest.approx(held)

        done = trainer.post(f"/v1/runs/{run['id']}/complete")
        assert done.status_code == 200 and done.json()["status"] == "completed"
        assert trainer.post(f"/v1/runs/{run['id']}/complete").json()["code"] == "run_not_active"

        # Releases until the cap refuses one.
        admitted = 0
        while True:
            response = trainer.post(
                "/v1/datasets/mnist/releases",
                {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.1},
            )
            if response.status_code == 409:
                assert response.json()["code"] == "budget_exhausted"
                break
            assert response.status_code == 201, response.text
            assert response.json()["noise_scale"] == pytest.approx(10.0)
            admitted += 1
            assert admitted < 100
        assert admitted >= 1

        dataset = auditor.get("/v1/datasets/mnist").json()
        assert dataset["epsilon_spent"] <= 4.3
        assert dataset["epsilon_reserved"] == dataset["epsilon_spent"]

        verified = auditor.get("/v1/datasets/mnist/ledger/verify").json()
        assert verified == {
            "ok": True,
            "entries": dataset["ledger_seq"],
            "last_seq": dataset["ledger_seq"],
            "last_hash": verified["last_hash"],
            "chain_ok": True,
            "replay_ok": True,
            "problems": [],
            "outside_guarantee": None,
        }
        page = auditor.get("/v1/datasets/mnist/ledger", params={"limit": 1000})
        assert page.status_code == 200, page.text
        entries = page.json()["data"]
        kinds = [e["kind"] for e in entries]
        expected_kinds = ["dataset_created", "hold", *["charge"] * EPOCHS, "release_hold"]
        assert kinds == expected_kinds + ["charge"] * admitted
        assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))

    # Independently: the cached curves equal the sum of every charge's own curve, and the
    # reported ε is the filter's ε of that sum (computed here from the accountant alone).
    with database.read() as session:
        row = session.get(Dataset, "mnist")
        assert row is not None
        budget = Budget.of(row)
        orders = budget.orders
        epoch_units = exact.to_units(SubsampledGaussian(Q, sigma, STEPS).rdp(orders))
        release_units = exact.to_units(rdp.laplace(10.0, orders=orders))
        expected = [
            EPOCHS * e + admitted * r for e, r in zip(epoch_units, release_units, strict=True)
        ]
        assert loads_units(row.posted_units) == expected
        assert loads_units(row.pending_units) == [0] * len(orders)
        reported = Filter(4.3, DELTA, orders).epsilon(exact.to_curve(expected))
        assert dataset["epsilon_spent"] == pytest.approx(reported, rel=1e-12)
