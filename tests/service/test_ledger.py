"""The ledger as auditors and admins see it: chain, tamper evidence, voids, caps, exports."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import random
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from accountant import exact
from accountant.members import PureTotal
from service.domain.budget import Budget, Cost
from service.domain.ledger import _canonical_text, _hashed_fields, canonical, entry_hash
from service.storage.database import Database
from service.storage.models import Dataset, LedgerEntry
from tests.service.conftest import Api

PLAN = {"sample_rate": 0.01, "steps_per_epoch": 100, "epochs": 3, "noise_multiplier": 1.5}


def _populate(api: Api) -> str:
    api.create_dataset("d", 5.0)
    run = api.post("/v1/datasets/d/runs", PLAN).json()
    for _ in range(2):
        assert api.post(f"/v1/runs/{run['id']}/epochs").status_code == 201
    assert api.post(f"/v1/runs/{run['id']}/abort").status_code == 200
    release = {"mechanism": "gaussian", "epsilon": 0.3, "delta": 1e-6}
    assert api.post("/v1/datasets/d/releases", release).status_code == 201
    return str(run["id"])


def _entries(api: Api, **params: object) -> list[dict[str, Any]]:
    response = api.get("/v1/datasets/d/ledger", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def _disable_append_only(database: Database) -> None:
    with database.write() as session:
        if database.is_sqlite:
            session.execute(text("DROP TRIGGER ledger_entries_no_update"))
            session.execute(text("DROP TRIGGER ledger_entries_no_delete"))
        else:
            session.execute(text("DROP TRIGGER ledger_entries_append_only ON ledger_entries"))


def test_entries_chain_and_replay(api: Api) -> None:
    run_id = _populate(api)
    entries = _entries(api)
    assert [e["kind"] for e in entries] == [
        "dataset_created",
        "hold",
        "charge",
        "charge",
        "release_hold",
        "charge",
    ]
    assert entries[0]["prev_hash"] == "0" * 64
    for previous, entry in itertools.pairwise(entries):
        assert entry["prev_hash"] == previous["hash"]
    hold, first, second, release_hold, release = entries[1:]
    assert hold["run_id"] == first["run_id"] == release_hold["run_id"] == run_id
    assert hold["mechanism"] == {
        "kind": "subsampled_gaussian",
        "sample_rate": 0.01,
        "noise_multiplier": 1.5,
        "steps": 300,
    }
    assert first["details"] == {"epoch": 1, "from_hold": True}
    assert release_hold["details"] == {"reason": "aborted", "epochs_released": 1}
    assert release["mechanism"]["kind"] == "gaussian"
    assert release["release_id"] and release["run_id"] is None
    # Each charge's own ε is below the composed figure after it; the composed ε grows.
    spent = [e["epsilon_spent_after"] for e in entries]
    assert spent == sorted(spent)
    assert first["epsilon"] < second["epsilon_spent_after"]
    # The entry's units are the hold's exactly: 3 epochs held, 2 charged, 1 released.
    epoch = first["units"]
    assert hold["units"] == [3 * u for u in epoch]
    assert release_hold["units"] == epoch
    verified = api.get("/v1/datasets/d/ledger/verify").json()
    assert verified["ok"] is True and verified["entries"] == 6


def test_filters_and_pagination(api: Api) -> None:
    run_id = _populate(api)
    assert [e["seq"] for e in _entries(api, kind="charge")] == [3, 4, 6]
    assert [e["seq"] for e in _entries(api, run_id=run_id)] == [2, 3, 4, 5]
    seen, after = [], 0
    while True:
        page = api.get("/v1/datasets/d/ledger", params={"limit": 4, "after": after}).json()
        seen += [e["seq"] for e in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["seq"]
    assert seen == [1, 2, 3, 4, 5, 6]


def test_csv_and_json_exports(api: Api) -> None:
    _populate(api)
    by_query = api.get("/v1/datasets/d/ledger", params={"format": "csv"})
    by_accept = api.get("/v1/datasets/d/ledger", headers={"Accept": "text/csv"})
    assert by_query.status_code == by_accept.status_code == 200
    assert by_query.headers["content-type"].startswith("text/csv")
    assert by_query.text == by_accept.text
    rows = list(csv.DictReader(io.StringIO(by_query.text)))
    assert [int(r["seq"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    entries = _entries(api)
    assert [r["hash"] for r in rows] == [e["hash"] for e in entries]
    assert json.loads(rows[1]["mechanism"]) == entries[1]["mechanism"]
    export = api.get("/v1/datasets/d/ledger", params={"format": "export"})
    assert export.status_code == 200
    assert export.json() == {"data": entries, "has_more": False}


def test_tampering_is_detected(api: Api, database: Database) -> None:
    _populate(api)
    # The database itself refuses edits to the ledger…
    with pytest.raises(Exception, match="append-only"), database.write() as session:
        session.execute(text("UPDATE ledger_entries SET epsilon = 0 WHERE seq = 3"))
    # …and if someone with table-owner rights edits it anyway, verify says exactly where.
    _disable_append_only(database)
    with database.write() as session:
        session.execute(
            text("UPDATE ledger_entries SET details = :details WHERE seq = 3"),
            {"details": '{"epoch":9,"from_hold":true}'},
        )
    verified = api.get("/v1/datasets/d/ledger/verify").json()
    assert verified["ok"] is False and verified["chain_ok"] is False
    assert any(p.startswith("seq 3: hash") for p in verified["problems"])


def test_deleted_entry_and_cache_drift_are_detected(api: Api, database: Database) -> None:
    _populate(api)
    _disable_append_only(database)
    with database.write() as session:
        session.execute(text("DELETE FROM ledger_entries WHERE seq = 4"))
    verified = api.get("/v1/datasets/d/ledger/verify").json()
    assert verified["chain_ok"] is False and verified["replay_ok"] is False
    assert any("seq 5: expected seq 4" in p for p in verified["problems"])


def test_cached_curve_drift_is_detected(api: Api, database: Database) -> None:
    _populate(api)
    with database.write() as session:
        row = session.get(Dataset, "d")
        assert row is not None
        budget = Budget.of(row)
        drift = exact.to_units([0.0] * (len(budget.orders) - 1) + [1e-9])
        budget.refund(Cost(drift, PureTotal()))
        budget.store(row)
    verified = api.get("/v1/datasets/d/ledger/verify").json()
    assert verified["chain_ok"] is True and verified["replay_ok"] is False
    assert verified["ok"] is False


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("active_runs", 3, "the dataset counts 3 active runs; its runs say 1"),
        ("lapse_check_at", "late", "the dataset's lapse bound is later than an active run's"),
    ],
)
def test_cached_run_count_and_lapse_bound_drift_are_detected(
    api: Api, database: Database, column: str, value: object, problem: str
) -> None:
    _populate(api)
    assert api.post("/v1/datasets/d/runs", PLAN).status_code == 201  # one active run
    assert api.get("/v1/datasets/d/ledger/verify").json()["ok"] is True
    with database.write() as session:
        row = session.get(Dataset, "d")
        assert row is not None and row.lapse_check_at is not None
        if value == "late":
            value = row.lapse_check_at + timedelta(seconds=1)
        setattr(row, column, value)
    verified = api.get("/v1/datasets/d/ledger/verify").json()
    assert verified["ok"] is False and verified["chain_ok"] is True, verified
    assert any(p.startswith(problem) for p in verified["problems"]), verified["problems"]


def test_void_refund_compensates_a_charge(api: Api) -> None:
    _populate(api)
    before = api.get("/v1/datasets/d").json()
    body = {"reason": "release never ran", "refund": True}
    voided = api.post("/v1/datasets/d/ledger/6/void", body)
    assert voided.status_code == 201, voided.text
    entry = voided.json()
    assert entry["kind"] == "void" and entry["voids_seq"] == 6
    assert entry["details"] == {"reason": "release never ran", "refund": True}
    after = api.get("/v1/datasets/d").json()
    assert after["epsilon_spent"] < before["epsilon_spent"]
    assert after["outside_guarantee"] == {
        "since_seq": 7,
        "reason": "entry 7 refunded the cost of charge 6",
    }
    # The charge is still in the ledger, unchanged; the chain and the replay still hold.
    assert _entries(api)[5]["kind"] == "charge"
    assert api.get("/v1/datasets/d/ledger/verify").json()["ok"] is True
    again = api.post("/v1/datasets/d/ledger/6/void", {"reason": "twice"})
    assert again.status_code == 409 and again.json()["code"] == "conflict"
    hold = api.post("/v1/datasets/d/ledger/2/void", {"reason": "not a charge"})
    assert hold.status_code == 409
    missing = api.post("/v1/datasets/d/ledger/99/void", {"reason": "nothing there"})
    assert missing.status_code == 404


def test_cap_changes_and_freeze_are_entries(api: Api) -> None:
    api.create_dataset("d", 1.0)
    release = {"mechanism": "laplace", "epsilon": 0.8}
    assert api.post("/v1/datasets/d/releases", release).status_code == 201
    assert api.post("/v1/datasets/d/releases", release).json()["code"] == "budget_exhausted"
    raised = api.patch("/v1/datasets/d", {"epsilon_cap": 3.0, "reason": "approved by DPO"})
    assert raised.status_code == 200 and raised.json()["epsilon_cap"] == 3.0
    assert api.post("/v1/datasets/d/releases", release).status_code == 201
    frozen = api.patch("/v1/datasets/d", {"frozen": True})
    assert frozen.json()["frozen"] is True
    refused = api.post("/v1/datasets/d/releases", release)
    assert refused.status_code == 409 and refused.json()["code"] == "dataset_frozen"
    # Lowered below what is spent: refused as a whole (the unfreeze with it too), so the
    # reported ε never passes the cap.
    patch = {"frozen": False, "epsilon_cap": 0.5, "description": "shrunk"}
    below = api.patch("/v1/datasets/d", patch)
    assert below.status_code == 409 and below.json()["code"] == "cap_below_reserved"
    assert api.get("/v1/datasets/d").json()["frozen"] is True
    api.patch("/v1/datasets/d", {"frozen": False, "epsilon_cap": 2.0, "description": "shrunk"})
    lowered = api.get("/v1/datasets/d").json()
    assert lowered["epsilon_reserved"] <= lowered["epsilon_cap"] == 2.0
    assert api.post("/v1/datasets/d/releases", release).json()["code"] == "budget_exhausted"
    kinds = [e["kind"] for e in _entries(api)]
    assert kinds == [
        "dataset_created",
        "charge",
        "cap_change",
        "charge",
        "freeze",
        "cap_change",
        "unfreeze",
        "description_change",
    ]
    cap_change = _entries(api, kind="cap_change")[0]
    assert cap_change["details"] == {"old": 1.0, "new": 3.0, "reason": "approved by DPO"}
    # Raised after a charge: not the cap fixed in advance that the filter's theorem needs.
    mark = {"since_seq": 3, "reason": "entry 3 raised the cap from 1 to 3"}
    assert lowered["outside_guarantee"] == mark
    verified = api.get("/v1/datasets/d/ledger/verify").json()
    assert verified["ok"] is True and verified["outside_guarantee"] == mark


def test_dry_runs_change_nothing(api: Api) -> None:
    api.create_dataset("d", 2.0)
    before = api.get("/v1/datasets/d").json()
    plan = api.post("/v1/datasets/d/runs", PLAN, params={"dry_run": "true"})
    assert plan.status_code == 200
    assert plan.json()["dry_run"] is True and plan.json()["admitted"] is True
    assert plan.json()["id"] is None and plan.json()["noise_multiplier"] == 1.5
    too_big = {**PLAN, "epochs": 1000}
    refused = api.post("/v1/datasets/d/runs", too_big, params={"dry_run": "true"}).json()
    assert refused["admitted"] is False and refused["refusal"]["code"] == "budget_exhausted"
    release = api.post(
        "/v1/datasets/d/releases",
        {"mechanism": "laplace", "epsilon": 0.1, "values": [1.0]},
        params={"dry_run": "true"},
    ).json()
    assert release["admitted"] is True and release["noised_values"] is None
    assert api.get("/v1/datasets/d").json() == before
    assert len(_entries(api)) == 1


def test_dataset_listing_and_conflicts(api: Api) -> None:
    for name in ("c", "a", "b"):
        api.create_dataset(name, 1.0)
    taken = api.post("/v1/datasets", {"id": "a", "epsilon_cap": 2.0, "delta": 1e-5})
    assert taken.status_code == 409 and taken.json()["code"] == "conflict"
    page = api.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in page["data"]] == ["a", "b"] and page["has_more"] is True
    rest = api.get("/v1/datasets", params={"limit": 2, "after": "b"}).json()
    assert [d["id"] for d in rest["data"]] == ["c"] and rest["has_more"] is False


@pytest.mark.parametrize("seed", range(40))
def test_spliced_canonical_text_is_canonical(seed: int) -> None:
    """The hashed text `append` splices from the row's stored JSON is exactly the canonical
    encoding `verify` recomputes from the decoded row (`entry_hash`), for rows with and
    without each optional field, non-ASCII text and floats of every size."""
    draw = random.Random(seed)

    def maybe(value: Any) -> Any:
        return value if draw.random() < 0.6 else None

    number = draw.choice(
        [0.0, 1e-300, 3.5, 1 / 3, 2.0**60, draw.random() * 10 ** draw.randint(-9, 9)]
    )
    details = {'ü\n"name"': draw.random(), "epoch": draw.randint(0, 99), "a": [1, None, "x"]}
    mechanism = {"kind": "gaussian", "sigma": draw.random(), "count": draw.randint(1, 9)}
    role = maybe(draw.choice(["trainer", "admin", "system"]))
    row: dict[str, Any] = {
        "dataset_id": "d-é",
        "seq": draw.randint(1, 10**6),
        "kind": "charge",
        "run_id": maybe("run_1"),
        "release_id": maybe("rel_2"),
        "voids_seq": maybe(draw.randint(1, 9)),
        "mechanism": maybe(canonical(mechanism)),
        "units": maybe(
            json.dumps([draw.randint(0, 10**12) for _ in range(5)], separators=(",", ":"))
        ),
        "pure": maybe("1/3;2"),
        "actor": "key_1",
        "actor_name": maybe("名前 \u2028 tab\t") if role else None,
        "actor_role": role,
        "idempotency_key": maybe("k\u00e9y"),
        "epsilon": maybe(number),
        "epsilon_spent_before": maybe(number / 7),
        "epsilon_reserved_before": maybe(0.0),
        "epsilon_spent_after": number,
        "epsilon_reserved_after": number * 2,
        "details": canonical(details),
        "created_at": "2026-12-07T15:00:00.123456Z",
        "prev_hash": "0" * 64,
        "hash": "",
    }
    entry = LedgerEntry(**row)
    assert _canonical_text(row) == canonical(_hashed_fields(entry))
    digest = hashlib.sha256(row["prev_hash"].encode("ascii"))
    digest.update(_canonical_text(row).encode("utf-8"))
    assert digest.hexdigest() == entry_hash(entry)
