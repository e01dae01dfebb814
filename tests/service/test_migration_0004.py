"""Migration 0004: a dataset created before the member filter keeps exactly its filter and its
figures, entry by entry; its old hash chain verifies; a refund before 0004 marks it."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import MetaData, create_engine, insert

from accountant import DEFAULT_ORDERS, Filter, exact, rdp
from accountant.mechanisms import Gaussian, Laplace, Mechanism, SubsampledGaussian
from accountant.members import PureTotal
from service.app import create_app
from service.domain.budget import loads_shares, member_filter
from service.settings import Settings
from tests.service.conftest import ADMIN_KEY, Api
from tests.service.test_migrations import _to

CAP, DELTA = 4.0, 1e-5
ORDERS = tuple(float(a) for a in DEFAULT_ORDERS)
T0 = datetime(2026, 6, 1, tzinfo=UTC)
# What a dataset without the pure-sum member is asked with (its filter never looks at it).
NO_PURE = PureTotal(impure=1)
RUN = {"sample_rate": 0.01, "steps_per_epoch": 50, "epochs": 3, "noise_multiplier": 1.3}


def _old_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """The hash entries had before 0004: SHA-256 over prev_hash and the canonical encoding."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(prev_hash.encode("ascii") + text.encode("utf-8")).hexdigest()


class _OldLedger:
    """Writes a ledger the way the service did before 0004 (uniform Filter, voids subtract)."""

    def __init__(self) -> None:
        self.filter = Filter(CAP, DELTA, ORDERS)
        self.posted = [0] * len(ORDERS)
        self.pending = [0] * len(ORDERS)
        self.rows: list[dict[str, Any]] = []
        self.cap = CAP

    def units(self, mechanism: Mechanism) -> list[int]:
        return exact.to_units(mechanism.rdp(ORDERS))

    def entry(
        self,
        kind: str,
        *,
        mechanism: Mechanism | None = None,
        units: list[int] | None = None,
        details: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        seq = len(self.rows) + 1
        fields = {
            "dataset_id": "old",
            "seq": seq,
            "kind": kind,
            "run_id": extra.get("run_id"),
            "release_id": extra.get("release_id"),
            "voids_seq": extra.get("voids_seq"),
            "mechanism": mechanism.params() if mechanism else None,
            "units": units,
            "actor": "bootstrap",
            "idempotency_key": None,
            "epsilon": rdp.to_epsilon(exact.to_curve(units), DELTA, ORDERS)[0] if units else None,
            "epsilon_spent_after": self.filter.epsilon(exact.to_curve(self.posted)),
            "epsilon_reserved_after": self.filter.epsilon(
                exact.to_curve(exact.add(self.posted, self.pending))
            ),
            "details": details or {},
            "created_at": (T0 + timedelta(seconds=seq)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        prev_hash = self.rows[-1]["hash"] if self.rows else "0" * 64
        row = {**fields, "prev_hash": prev_hash, "hash": _old_hash(prev_hash, fields)}
        row["mechanism"] = json.dumps(fields["mechanism"], sort_keys=True, separators=(",", ":"))
        row["mechanism"] = row["mechanism"] if mechanism else None
        row["units"] = json.dumps(units, separators=(",", ":")) if units is not None else None
        row["details"] = json.dumps(row["details"], sort_keys=True, separators=(",", ":"))
        self.rows.append(row)


def _write_old_dataset(url: str) -> tuple[_OldLedger, list[int]]:
    old = _OldLedger()
    epoch_mechanism = SubsampledGaussian(RUN["sample_rate"], RUN["noise_multiplier"], 50)
    epoch = old.units(epoch_mechanism)
    created = {"epsilon_cap": CAP, "delta": DELTA, "description": "", "orders": list(ORDERS)}
    old.entry("dataset_created", details=created)
    plan = [3 * u for u in epoch]
    old.pending = exact.add(old.pending, plan)
    old.entry("hold", mechanism=SubsampledGaussian(0.01, 1.3, 150), units=plan, run_id="run_old")
    old.pending = exact.subtract(old.pending, epoch)
    old.posted = exact.add(old.posted, epoch)
    details = {"epoch": 1, "from_hold": True}
    old.entry("charge", mechanism=epoch_mechanism, units=epoch, run_id="run_old", details=details)
    releases: list[Mechanism] = [Gaussian(4.0), Laplace(10.0), Laplace(5.0)]
    for number, mechanism in enumerate(releases):
        units = old.units(mechanism)
        old.posted = exact.add(old.posted, units)
        old.entry("charge", mechanism=mechanism, units=units, release_id=f"rel_{number}")
    # A void before 0004 subtracted the charge's cost: a refund, in today's words.
    voided = old.rows[4]
    old.posted = exact.subtract(old.posted, json.loads(voided["units"]))
    old.entry(
        "void",
        mechanism=Laplace(10.0),
        units=json.loads(voided["units"]),
        voids_seq=5,
        release_id="rel_1",
        details={"reason": "typo"},
    )
    old.entry("cap_change", details={"old": CAP, "new": 5.0})

    engine = create_engine(url)
    try:
        _to(engine, "0002")
        tables = MetaData()
        tables.reflect(engine)
        with engine.begin() as connection:
            connection.execute(
                insert(tables.tables["datasets"]).values(
                    id="old",
                    description="",
                    epsilon_cap=5.0,
                    delta=DELTA,
                    frozen=False,
                    orders=json.dumps(list(ORDERS)),
                    posted_units=json.dumps(old.posted),
                    pending_units=json.dumps(old.pending),
                    last_seq=len(old.rows),
                    last_hash=old.rows[-1]["hash"],
                    active_runs=1,
                    lapse_check_at=T0 + timedelta(days=3650),
                    created_at=T0,
                    updated_at=T0,
                )
            )
            connection.execute(
                insert(tables.tables["runs"]).values(
                    id="run_old",
                    dataset_id="old",
                    status="active",
                    sampling="poisson",
                    epochs_charged=1,
                    epsilon=1.0,
                    epsilon_per_epoch=0.5,
                    epoch_units=json.dumps(epoch),
                    lease_seconds=3600,
                    expires_at=T0 + timedelta(days=3650),
                    created_by="bootstrap",
                    created_at=T0,
                    updated_at=T0,
                    **RUN,
                )
            )
            for row in old.rows:
                connection.execute(insert(tables.tables["ledger_entries"]).values(**row))
        _to(engine, "head")
    finally:
        engine.dispose()
    return old, epoch


def test_a_dataset_from_before_0004_keeps_every_figure(database_url: str) -> None:
    old, epoch = _write_old_dataset(database_url)
    settings = Settings(database_url=database_url, admin_key=ADMIN_KEY)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, ADMIN_KEY)
        dataset = api.get("/v1/datasets/old").json()
        final = old.rows[-1]
        assert dataset["epsilon_spent"] == final["epsilon_spent_after"]
        assert dataset["epsilon_reserved"] == final["epsilon_reserved_after"]
        assert dataset["shares"] == {
            "profile": "uniform",
            "orders": list(ORDERS),
            "weights": [f"1/{len(ORDERS)}"] * len(ORDERS),
            "pure_sum": False,
            "plan": None,
            "fixed_at_seq": None,  # shown since first_admission; fixed at creation here
        }
        # The refund before 0004 is found and said.
        mark = {"since_seq": 7, "reason": "entry 7 refunded the cost of charge 5"}
        assert dataset["outside_guarantee"] == mark

        # Entry by entry, the member filter with the stored shares reports the old figures.
        stored = loads_shares(json.dumps(dataset["shares"]))
        replay = member_filter(5.0, DELTA, stored.shares)
        entries = api.get("/v1/datasets/old/ledger", params={"limit": 100}).json()["data"]
        posted, pending = [0] * len(ORDERS), [0] * len(ORDERS)
        for entry, written in zip(entries, old.rows, strict=True):
            assert entry["hash"] == written["hash"]
            assert entry["epsilon_spent_after"] == written["epsilon_spent_after"]
            assert entry["epsilon_spent_before"] is None and entry["pure"] is None
            units = entry["units"]
            if entry["kind"] == "hold":
                pending = exact.add(pending, units)
            elif entry["kind"] == "charge":
                posted = exact.add(posted, units)
                if entry["details"].get("from_hold"):
                    pending = exact.subtract(pending, units)
            elif entry["kind"] == "void":
                posted = exact.subtract(posted, units)
            figures = (
                replay.epsilon(exact.to_curve(posted), NO_PURE),
                replay.epsilon(exact.to_curve(exact.add(posted, pending)), NO_PURE),
            )
            assert figures == (written["epsilon_spent_after"], written["epsilon_reserved_after"])

        verified = api.get("/v1/datasets/old/ledger/verify").json()
        assert verified["ok"] is True and verified["chain_ok"] is True, verified
        assert verified["outside_guarantee"] == mark

        # The next admission starts from the old figures, and still has no pure part.
        charged = api.post("/v1/runs/run_old/epochs")
        assert charged.status_code == 201, charged.text
        effect = charged.json()["effect"]
        assert effect["epsilon_spent_before"] == final["epsilon_spent_after"]
        assert effect["epsilon_reserved_before"] == final["epsilon_reserved_after"]
        assert effect["epsilon_reserved_after"] == final["epsilon_reserved_after"]
        posted = exact.add(posted, epoch)
        expected = Filter(5.0, DELTA, ORDERS).epsilon(exact.to_curve(posted))
        assert effect["epsilon_spent_after"] == expected
        latest = api.get("/v1/datasets/old/ledger", params={"after": 8}).json()["data"]
        assert latest[0]["pure"] is None
        assert api.get("/v1/datasets/old/ledger/verify").json()["ok"] is True
