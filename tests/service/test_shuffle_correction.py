"""Shuffle runs charged the old way (one Gaussian step of σ per epoch) get a visible top-up.

Each test builds a dataset at revision 0002 exactly as the old code wrote it — its rows,
its curves and a hash chain computed here, independently of `service.domain.ledger` —
upgrades to head and uses it through the app. The old entries must stay as they were,
and the figures after the correction must equal those of the same history run afresh.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, MetaData, create_engine, insert, text

from accountant import DEFAULT_ORDERS, Filter, calibrate, exact
from accountant.mechanisms import Gaussian, Mechanism, SubsampledGaussian
from accountant.rdp import to_epsilon
from service.app import create_app
from service.settings import Settings
from service.storage import migrate
from tests.service.conftest import ADMIN_KEY, Api, replay_units

DELTA = 1e-5
ORDERS = tuple(float(a) for a in DEFAULT_ORDERS)
SIGMA_A, SIGMA_B, SIGMA_P, Q_P, STEPS_P = 3.0, 5.0, 1.2, 0.01, 20
ZERO = [0] * len(ORDERS)


def _to(engine: Engine, revision: str) -> None:
    config = migrate.alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _units(mechanism: Mechanism) -> list[int]:
    return exact.to_units(mechanism.rdp(ORDERS))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _times(count: int, units: list[int]) -> list[int]:
    return [count * unit for unit in units]


@dataclass
class OldFigures:
    """The figures the code before migration 0004 wrote: one uniform filter at δ/|Λ|."""

    filter: Filter
    posted: list[int]
    pending: list[int]

    def own_epsilon(self, units: list[int]) -> float:
        return to_epsilon(exact.to_curve(units), DELTA, ORDERS)[0]

    def epsilon_spent(self) -> float:
        return self.filter.epsilon(exact.to_curve(self.posted))

    def epsilon_reserved(self) -> float:
        return self.filter.epsilon(exact.to_curve(exact.add(self.posted, self.pending)))

    def units_of(self, mechanism: Mechanism) -> list[int]:
        return exact.to_units(mechanism.rdp(ORDERS))


@dataclass
class OldLedger:
    """One dataset's rows as the code before migration 0003 wrote them."""

    dataset_id: str
    cap: float
    posted: list[int] = field(default_factory=lambda: list(ZERO))
    pending: list[int] = field(default_factory=lambda: list(ZERO))
    entries: list[dict[str, Any]] = field(default_factory=list)
    last_hash: str = "0" * 64

    def budget(self) -> OldFigures:
        return OldFigures(Filter(self.cap, DELTA, ORDERS), self.posted, self.pending)

    def append(
        self, kind: str, mechanism: Mechanism | None, units: list[int] | None, **fields: Any
    ) -> None:
        budget = self.budget()
        entry = {
            "dataset_id": self.dataset_id,
            "seq": len(self.entries) + 1,
            "kind": kind,
            "run_id": fields.get("run_id"),
            "release_id": None,
            "voids_seq": None,
            "mechanism": mechanism.params() if mechanism else None,
            "units": units,
            "actor": "key_old",
            "idempotency_key": None,
            "epsilon": budget.own_epsilon(units) if units is not None else None,
            "epsilon_spent_after": budget.epsilon_spent(),
            "epsilon_reserved_after": budget.epsilon_reserved(),
            "details": fields.get("details", {}),
            "created_at": f"2026-06-01T00:00:{len(self.entries):02d}.000000Z",
        }
        # The chain as documented (DESIGN.md §4): SHA-256 of prev_hash + canonical JSON.
        encoded = (self.last_hash + _json(entry)).encode("utf-8")
        digest = hashlib.sha256(encoded).hexdigest()
        self.entries.append({**entry, "prev_hash": self.last_hash, "hash": digest})
        self.last_hash = digest


@dataclass(frozen=True)
class Legacy:
    """What was built: the database URL, the old entries and the old reserved ε."""

    url: str
    entries: list[dict[str, Any]]
    old_reserved: float


def build_legacy(url: str, cap: float, lease_end: datetime) -> Legacy:
    """At revision 0002: dataset "old" with shuffle run A (active, 2 of 5 epochs charged),
    shuffle run B (completed after 2 of 3) and Poisson run P (completed after 1 of 1); and
    dataset "plain" with only run P's twin. Then upgrade to head."""
    engine = create_engine(url)
    try:
        _to(engine, "0002")
        tables = MetaData()
        tables.reflect(engine)
        t0 = datetime(2026, 6, 1, tzinfo=UTC)
        rows: dict[str, list[dict[str, Any]]] = {"datasets": [], "runs": [], "ledger": []}
        old = OldLedger("old", cap)
        for dataset_id, runs in (("old", ("a", "b", "p")), ("plain", ("p",))):
            ledger = old if dataset_id == "old" else OldLedger(dataset_id, cap)
            details = {"epsilon_cap": cap, "delta": DELTA, "description": "", "orders": [*ORDERS]}
            ledger.append("dataset_created", None, None, details=details)
            for name in runs:
                run_id = f"run_{dataset_id}_{name}"
                sigma = {"a": SIGMA_A, "b": SIGMA_B, "p": SIGMA_P}[name]
                epochs, charged = {"a": (5, 2), "b": (3, 2), "p": (1, 1)}[name]
                # The old charges: a shuffle epoch was one Gaussian step of σ.
                shuffle = name != "p"
                per_epoch: Mechanism = (
                    Gaussian(sigma, 1) if shuffle else SubsampledGaussian(Q_P, sigma, STEPS_P)
                )
                plan: Mechanism = (
                    Gaussian(sigma, epochs)
                    if shuffle
                    else SubsampledGaussian(Q_P, sigma, STEPS_P * epochs)
                )
                unit = _units(per_epoch)
                ledger.pending = exact.add(ledger.pending, _times(epochs, unit))
                sampling = "shuffle" if shuffle else "poisson"
                hold_details = {
                    "epochs": epochs,
                    "steps_per_epoch": STEPS_P,
                    "sampling": sampling,
                    "target_epsilon": None,
                    "name": None,
                }
                held = _times(epochs, unit)
                ledger.append("hold", plan, held, run_id=run_id, details=hold_details)
                for epoch in range(1, charged + 1):
                    ledger.pending = exact.subtract(ledger.pending, unit)
                    ledger.posted = exact.add(ledger.posted, unit)
                    charge_details = {"epoch": epoch, "from_hold": True}
                    ledger.append("charge", per_epoch, unit, run_id=run_id, details=charge_details)
                status = "active" if name == "a" else "completed"
                if status == "completed":
                    left = epochs - charged
                    ledger.pending = exact.subtract(ledger.pending, _times(left, unit))
                    released = (Gaussian(sigma, left) if shuffle else None) if left else None
                    ledger.append(
                        "release_hold",
                        released,
                        _times(left, unit),
                        run_id=run_id,
                        details={"reason": "completed", "epochs_released": left},
                    )
                # The old calibration: q = 1 and one step of σ per epoch for shuffle.
                q, steps = (1.0, 1) if shuffle else (Q_P, STEPS_P)
                rows["runs"].append(
                    {
                        "id": run_id,
                        "dataset_id": dataset_id,
                        "status": status,
                        "sampling": sampling,
                        "sample_rate": Q_P,
                        "steps_per_epoch": STEPS_P,
                        "epochs": epochs,
                        "epochs_charged": charged,
                        "noise_multiplier": sigma,
                        "epsilon": calibrate.dp_sgd_epsilon(sigma, DELTA, q, steps * epochs),
                        "epsilon_per_epoch": calibrate.dp_sgd_epsilon(sigma, DELTA, q, steps),
                        "epoch_units": json.dumps(unit, separators=(",", ":")),
                        "lease_seconds": 3600,
                        "expires_at": lease_end if status == "active" else t0,
                        "created_by": "key_old",
                        "created_at": t0,
                        "updated_at": t0,
                    }
                )
            active = dataset_id == "old"
            rows["datasets"].append(
                {
                    "id": dataset_id,
                    "description": "",
                    "epsilon_cap": cap,
                    "delta": DELTA,
                    "frozen": False,
                    "orders": json.dumps([*ORDERS]),
                    "posted_units": json.dumps(ledger.posted, separators=(",", ":")),
                    "pending_units": json.dumps(ledger.pending, separators=(",", ":")),
                    "last_seq": len(ledger.entries),
                    "last_hash": ledger.last_hash,
                    "active_runs": 1 if active else 0,
                    "lapse_check_at": lease_end if active else None,
                    "created_at": t0,
                    "updated_at": t0,
                }
            )
            for entry in ledger.entries:
                stored = {
                    **entry,
                    "mechanism": _json(entry["mechanism"]) if entry["mechanism"] else None,
                    "units": _json(entry["units"]) if entry["units"] is not None else None,
                    "details": _json(entry["details"]),
                }
                rows["ledger"].append(stored)
        with engine.begin() as connection:
            connection.execute(insert(tables.tables["datasets"]), rows["datasets"])
            connection.execute(insert(tables.tables["runs"]), rows["runs"])
            connection.execute(insert(tables.tables["ledger_entries"]), rows["ledger"])
        _to(engine, "head")
    finally:
        engine.dispose()
    return Legacy(url, old.entries, old.budget().epsilon_reserved())


@pytest.fixture
def client_for() -> Iterator[Any]:
    clients: list[TestClient] = []

    def open_client(url: str) -> Api:
        settings = Settings(database_url=url, admin_key=ADMIN_KEY)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return Api(client, ADMIN_KEY)

    yield open_client
    for client in clients:
        client.__exit__(None, None, None)


def _flags(url: str) -> dict[str, bool]:
    """Which datasets still owe corrections, read behind the API's back."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, corrections_due FROM datasets")).all()
        return {name: bool(due) for name, due in rows}
    finally:
        engine.dispose()


def _entries(api: Api, dataset_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/v1/datasets/{dataset_id}/ledger", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def _replay_fresh(api: Api, cap: float, first_touch: str) -> dict[str, str]:
    """The same history as dataset "old", run afresh by today's code on a dataset "fresh"."""
    # Uniform shares, the filter the migrated dataset keeps (no pure-sum member can decide here).
    api.create_dataset("fresh", cap, DELTA, shares={"profile": "uniform"})
    shuffle = {"sample_rate": Q_P, "steps_per_epoch": STEPS_P, "sampling": "shuffle"}
    ids = {}
    for name, sigma, epochs, charged, body in (
        ("a", SIGMA_A, 5, 2, shuffle),
        ("b", SIGMA_B, 3, 2, shuffle),
        ("p", SIGMA_P, 1, 1, {"sample_rate": Q_P, "steps_per_epoch": STEPS_P}),
    ):
        plan = {**body, "epochs": epochs, "noise_multiplier": sigma}
        run = api.post("/v1/datasets/fresh/runs", plan).json()
        ids[name] = run["id"]
        for _ in range(charged):
            assert api.post(f"/v1/runs/{run['id']}/epochs").status_code == 201
        if name != "a":
            assert api.post(f"/v1/runs/{run['id']}/complete").status_code == 200
    if first_touch == "epoch":
        assert api.post(f"/v1/runs/{ids['a']}/epochs").status_code == 201
    return ids


FIGURES = ("epsilon_spent", "epsilon_reserved", "epsilon_remaining", "active_runs")


@pytest.mark.parametrize("first_touch", ["read", "epoch"])
def test_old_shuffle_charges_are_topped_up_once_and_match_a_fresh_history(
    database_url: str, client_for: Any, first_touch: str
) -> None:
    lease_end = datetime.now(UTC) + timedelta(hours=1)
    legacy = build_legacy(database_url, 100.0, lease_end)
    assert _flags(database_url) == {"old": True, "plain": False}
    api = client_for(database_url)

    # The first transaction on the flagged dataset: a read's lazy refresh, or an epoch.
    if first_touch == "epoch":
        epoch = api.post("/v1/runs/run_old_a/epochs")
        assert epoch.status_code == 201, epoch.text
        assert epoch.json()["noise_multiplier"] == SIGMA_A
    entries = _entries(api, "old")
    assert _flags(database_url) == {"old": False, "plain": False}
    old_count = len(legacy.entries)
    # The old entries are untouched: same hashes as computed at 0002.
    assert [e["hash"] for e in entries[:old_count]] == [e["hash"] for e in legacy.entries]
    assert [e["kind"] for e in entries[:old_count]] == [e["kind"] for e in legacy.entries]
    added = entries[old_count:]
    expected = [("correction", "run_old_a"), ("hold_top_up", "run_old_a")]
    expected += [("correction", "run_old_b")]
    if first_touch == "epoch":
        expected += [("charge", "run_old_a")]
    assert [(e["kind"], e["run_id"]) for e in added] == expected

    a_old, a_new = _units(Gaussian(SIGMA_A, 1)), _units(Gaussian(SIGMA_A / 2, 1))
    b_old, b_new = _units(Gaussian(SIGMA_B, 1)), _units(Gaussian(SIGMA_B / 2, 1))
    correction_a, top_up_a, correction_b = added[:3]
    assert correction_a["units"] == _times(2, exact.subtract(a_new, a_old))
    assert correction_a["mechanism"] == Gaussian(SIGMA_A / 2, 2).params()
    assert correction_a["details"]["charged_before"] == Gaussian(SIGMA_A, 1).params()
    assert correction_a["details"]["epochs"] == 2 and correction_a["actor"] == "system"
    assert "2C" in correction_a["details"]["reason"]
    assert top_up_a["units"] == _times(3, exact.subtract(a_new, a_old))
    assert top_up_a["mechanism"] == Gaussian(SIGMA_A / 2, 3).params()
    assert correction_b["units"] == _times(2, exact.subtract(b_new, b_old))
    if first_touch == "epoch":
        assert added[3]["units"] == a_new  # the next epoch is charged honestly

    # The chain and the replay hold, with the new kinds; here and independently.
    verified = api.get("/v1/datasets/old/ledger/verify").json()
    assert verified["ok"] is True, verified
    posted, pending = replay_units(entries, len(ORDERS))
    epochs_a = 3 if first_touch == "epoch" else 2
    p_units = _units(SubsampledGaussian(Q_P, SIGMA_P, STEPS_P))
    assert posted == exact.add(exact.add(_times(epochs_a, a_new), _times(2, b_new)), p_units)
    assert pending == _times(5 - epochs_a, a_new)

    # The figures equal the same history run afresh; the run's own ε too.
    ids = _replay_fresh(api, 100.0, first_touch)
    old, fresh = api.get("/v1/datasets/old").json(), api.get("/v1/datasets/fresh").json()
    assert {k: old[k] for k in FIGURES} == {k: fresh[k] for k in FIGURES}
    old_a, fresh_a = api.get("/v1/runs/run_old_a").json(), api.get(f"/v1/runs/{ids['a']}").json()
    assert old_a["epsilon"] == fresh_a["epsilon"]
    assert old_a["epsilon_per_epoch"] == fresh_a["epsilon_per_epoch"]

    # Once only: later transactions add nothing; the plain dataset never owed anything.
    assert len(_entries(api, "old")) == len(entries)
    assert [e["kind"] for e in _entries(api, "plain")] == [
        "dataset_created",
        "hold",
        "charge",
        "release_hold",
    ]
    # Completing run A releases exactly what it still holds, at the corrected units.
    assert api.post("/v1/runs/run_old_a/complete").status_code == 200
    assert api.post(f"/v1/runs/{ids['a']}/complete").status_code == 200
    old, fresh = api.get("/v1/datasets/old").json(), api.get("/v1/datasets/fresh").json()
    assert {k: old[k] for k in FIGURES} == {k: fresh[k] for k in FIGURES}
    assert api.get("/v1/datasets/old/ledger/verify").json()["ok"] is True


def test_a_correction_above_the_cap_is_reported_honestly_and_admits_nothing_more(
    database_url: str, client_for: Any, tmp_path: Any
) -> None:
    # The cap between the old reserved ε and the corrected spent ε: find both first.
    probe = build_legacy(f"sqlite:///{tmp_path / 'probe.db'}", 100.0, datetime.now(UTC))
    fresh = client_for(probe.url)
    _replay_fresh(fresh, 100.0, "read")
    corrected = fresh.get("/v1/datasets/fresh").json()["epsilon_spent"]
    assert corrected > probe.old_reserved
    cap = (corrected + probe.old_reserved) / 2

    legacy = build_legacy(database_url, cap, datetime.now(UTC) + timedelta(hours=1))
    assert legacy.old_reserved <= cap  # the old charges fitted
    api = client_for(database_url)
    dataset = api.get("/v1/datasets/old").json()
    assert dataset["epsilon_spent"] == pytest.approx(corrected, rel=1e-12)
    assert cap < dataset["epsilon_spent"] <= dataset["epsilon_reserved"] < float("inf")
    assert dataset["epsilon_remaining"] == 0.0
    listed = api.get("/v1/datasets").json()["data"]
    assert [d["epsilon_spent"] for d in listed if d["id"] == "old"] == [dataset["epsilon_spent"]]
    release = {"mechanism": "laplace", "epsilon": 0.01}
    refused = api.post("/v1/datasets/old/releases", release)
    assert refused.status_code == 409 and refused.json()["code"] == "budget_exhausted"
    plan = {"sample_rate": 0.01, "steps_per_epoch": 1, "epochs": 1, "noise_multiplier": 50.0}
    refused = api.post("/v1/datasets/old/runs", plan)
    assert refused.status_code == 409 and refused.json()["code"] == "budget_exhausted"
    assert api.get("/v1/datasets/old/ledger/verify").json()["ok"] is True
