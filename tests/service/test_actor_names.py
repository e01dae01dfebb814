"""Who wrote each entry: the actor key's name and role at write time, inside the hash chain.

The migration test builds a chain at revision 0003 exactly as the old code wrote it (hashes
computed here, independently of `service.domain.ledger`), upgrades to head and writes on: old
entries keep their hashes and verify, new ones carry the names and chain onto them.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, create_engine, insert, text

from accountant.mechanisms import Laplace
from service.app import create_app
from service.settings import Settings
from service.storage import migrate
from service.storage.database import Database
from tests.service.conftest import ADMIN_KEY, Api
from tests.service.test_shuffle_correction import DELTA, ORDERS, OldLedger, _json

PLAN = {"sample_rate": 1.0, "steps_per_epoch": 1, "epochs": 3, "noise_multiplier": 50.0}
RELEASE = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.01}
DEADLINE_SECONDS = 15.0


def _entries(api: Api, dataset_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/v1/datasets/{dataset_id}/ledger", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def _verify(api: Api, dataset_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/datasets/{dataset_id}/ledger/verify")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _named_key(api: Api, role: str, name: str | None, datasets: list[str] | None = None) -> Api:
    response = api.post("/v1/keys", {"role": role, "name": name, "datasets": datasets})
    assert response.status_code == 201, response.text
    return api.as_key(response.json()["key"])


def _build_at_0003(url: str) -> list[dict[str, Any]]:
    """Dataset "old" at revision 0003: created, then one laplace charge; returns its entries."""
    engine = create_engine(url)
    try:
        config = migrate.alembic_config(url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0003")
        old = OldLedger("old", 10.0)
        details = {"epsilon_cap": 10.0, "delta": DELTA, "description": "", "orders": [*ORDERS]}
        old.append("dataset_created", None, None, details=details)
        mechanism = Laplace(100.0)
        units = old.budget().units_of(mechanism)
        old.posted = list(units)
        old.append("charge", mechanism, units, details={"from_hold": False})
        t0 = datetime(2026, 6, 1, tzinfo=UTC)
        tables = MetaData()
        tables.reflect(engine)
        dataset = {
            "id": "old",
            "description": "",
            "epsilon_cap": 10.0,
            "delta": DELTA,
            "frozen": False,
            "orders": json.dumps([*ORDERS]),
            "posted_units": _json(old.posted),
            "pending_units": _json(old.pending),
            "last_seq": len(old.entries),
            "last_hash": old.last_hash,
            "created_at": t0,
            "updated_at": t0,
        }
        stored = [
            {
                **entry,
                "mechanism": _json(entry["mechanism"]) if entry["mechanism"] else None,
                "units": _json(entry["units"]) if entry["units"] is not None else None,
                "details": _json(entry["details"]),
            }
            for entry in old.entries
        ]
        with engine.begin() as connection:
            connection.execute(insert(tables.tables["datasets"]), [dataset])
            connection.execute(insert(tables.tables["ledger_entries"]), stored)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()
    return old.entries


def test_a_chain_written_at_0003_verifies_after_upgrade_and_new_entries_chain_on(
    database_url: str,
) -> None:
    old_entries = _build_at_0003(database_url)
    settings = Settings(database_url=database_url, admin_key=ADMIN_KEY)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        admin = Api(client, ADMIN_KEY)
        assert _verify(admin, "old")["ok"]
        trainer = _named_key(admin, "trainer", "alice's notebook", ["old"])
        assert trainer.post("/v1/datasets/old/releases", RELEASE).status_code == 201
        cap = admin.patch("/v1/datasets/old", {"epsilon_cap": 9.0, "reason": "policy"})
        assert cap.status_code == 200, cap.text
        entries = _entries(admin, "old")
        verified = _verify(admin, "old")

    assert verified["ok"] and verified["chain_ok"] and verified["entries"] == 4
    old, new = entries[:2], entries[2:]
    # The old entries are as written at 0003: same hashes, no name or role.
    assert [e["hash"] for e in old] == [e["hash"] for e in old_entries]
    assert all(e["actor_name"] is None and e["actor_role"] is None for e in old)
    assert new[0]["prev_hash"] == old_entries[-1]["hash"]
    assert (new[0]["actor_name"], new[0]["actor_role"]) == ("alice's notebook", "trainer")
    assert new[0]["actor"] == trainer.key.split("_")[1]  # type: ignore[union-attr]
    # The bootstrap admin key (LEDGER_ADMIN_KEY) has no row: its fixed, documented values.
    assert (new[1]["actor"], new[1]["actor_name"], new[1]["actor_role"]) == (
        "bootstrap",
        "LEDGER_ADMIN_KEY",
        "admin",
    )


def test_names_are_those_at_write_time_and_inside_the_hash(api: Api, database: Database) -> None:
    api.create_dataset("d", 10.0)
    trainer = _named_key(api, "trainer", "etl job", ["d"])
    unnamed = _named_key(api, "trainer", None, ["d"])
    assert trainer.post("/v1/datasets/d/releases", RELEASE).status_code == 201
    assert unnamed.post("/v1/datasets/d/releases", RELEASE).status_code == 201
    # The key is renamed behind the API's back (no route renames keys): entries keep the old name.
    trainer_id = trainer.key.split("_")[1]  # type: ignore[union-attr]
    with database.write() as session:
        session.execute(
            text("UPDATE api_keys SET name = 'renamed' WHERE id = :id"), {"id": trainer_id}
        )
    # The name is the one read at sign-in: a process trusts a verified key for up to
    # LEDGER_KEY_CACHE_SECONDS, so the new name is in force within that bound. Poll for it.
    deadline = time.monotonic() + 10
    while True:
        assert trainer.post("/v1/datasets/d/releases", RELEASE).status_code == 201
        if _entries(api, "d")[-1]["actor_name"] == "renamed" or time.monotonic() > deadline:
            break
    entries = _entries(api, "d")
    charges = [e for e in entries if e["kind"] == "charge"]
    named, anonymous, renamed = charges[0], charges[1], charges[-1]
    # Every charge the trainer made before the new name took hold kept the old one.
    assert {e["actor_name"] for e in charges[2:-1]} <= {"etl job"}
    assert (named["actor"], named["actor_name"], named["actor_role"]) == (
        trainer_id,
        "etl job",
        "trainer",
    )
    assert (anonymous["actor_name"], anonymous["actor_role"]) == (None, "trainer")
    assert renamed["actor_name"] == "renamed"
    assert entries[0]["actor_role"] == "admin"  # dataset_created, by the bootstrap key
    # The CSV export carries them too.
    exported = api.get("/v1/datasets/d/ledger", params={"format": "csv"}).text
    assert "actor_name,actor_role" in exported.splitlines()[0]
    assert ",etl job,trainer," in exported
    assert _verify(api, "d")["ok"]

    # Changing a recorded name breaks the chain at that entry: the name is inside the hash.
    with database.write() as session:
        if database.is_sqlite:
            session.execute(text("DROP TRIGGER ledger_entries_no_update"))
        else:
            session.execute(text("DROP TRIGGER ledger_entries_append_only ON ledger_entries"))
        session.execute(
            text("UPDATE ledger_entries SET actor_name = 'someone else' WHERE seq = :seq"),
            {"seq": named["seq"]},
        )
    tampered = _verify(api, "d")
    assert not tampered["ok"] and not tampered["chain_ok"]
    assert tampered["problems"] == [f"seq {named['seq']}: hash does not match the entry's contents"]
    # Erasing the pair, to pass the entry off as an old one, is caught the same way.
    with database.write() as session:
        session.execute(
            text("UPDATE ledger_entries SET actor_name = NULL, actor_role = NULL WHERE seq = :seq"),
            {"seq": anonymous["seq"]},
        )
    assert f"seq {anonymous['seq']}: hash does not match" in " ".join(_verify(api, "d")["problems"])


def test_a_lapsed_lease_is_released_by_the_system_actor(api: Api) -> None:
    api.create_dataset("d", 10.0)
    trainer = _named_key(api, "trainer", "short lease", ["d"])
    run = trainer.post("/v1/datasets/d/runs", {**PLAN, "lease_seconds": 1})
    assert run.status_code == 201, run.text
    deadline = time.monotonic() + DEADLINE_SECONDS
    while _entries(api, "d")[-1]["kind"] != "release_hold":
        assert time.monotonic() < deadline, "the lapsed hold was never released"
        time.sleep(0.05)
    hold, released = _entries(api, "d")[-2:]
    assert (hold["actor_name"], hold["actor_role"]) == ("short lease", "trainer")
    assert (released["actor"], released["actor_name"], released["actor_role"]) == (
        "system",
        "ledger service",
        "system",
    )
