"""Migrations: the schema they build is the models' schema, and each one carries data forward."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, create_engine, insert, select, text
from sqlalchemy.exc import DBAPIError

from service.storage import migrate
from service.storage.models import Base

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _to(engine: Engine, revision: str, *, down: bool = False) -> None:
    config = migrate.alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def _utc(moment: datetime | None) -> datetime | None:
    """A timestamp as read back: naive from SQLite (stored as UTC), aware from PostgreSQL."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def test_migrations_build_the_models_schema(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        _to(engine, "head")
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
    finally:
        engine.dispose()


def test_0002_counts_active_runs_and_bounds_their_leases(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        _to(engine, "0001")
        tables = MetaData()
        tables.reflect(engine)
        datasets, runs = tables.tables["datasets"], tables.tables["runs"]
        dataset = {
            "description": "",
            "epsilon_cap": 1.0,
            "delta": 1e-5,
            "frozen": False,
            "orders": "[2.0]",
            "posted_units": "[0]",
            "pending_units": "[0]",
            "last_seq": 0,
            "last_hash": "0" * 64,
            "created_at": T0,
            "updated_at": T0,
        }
        run = {
            "sampling": "poisson",
            "sample_rate": 0.01,
            "steps_per_epoch": 1,
            "epochs": 1,
            "epochs_charged": 0,
            "noise_multiplier": 1.0,
            "epsilon": 1.0,
            "epsilon_per_epoch": 1.0,
            "epoch_units": "[0]",
            "lease_seconds": 60,
            "created_by": "k",
            "created_at": T0,
            "updated_at": T0,
        }
        leases = {  # run: (dataset, status, lease end)
            "r1": ("busy", "active", T0 + timedelta(hours=2)),
            "r2": ("busy", "active", T0 + timedelta(hours=1)),
            "r3": ("busy", "completed", T0),
            "r4": ("idle", "expired", T0),
        }
        with engine.begin() as connection:
            for name in ("busy", "idle"):
                connection.execute(insert(datasets).values(id=name, **dataset))
            for run_id, (owner, status, ends) in leases.items():
                connection.execute(
                    insert(runs).values(
                        id=run_id, dataset_id=owner, status=status, expires_at=ends, **run
                    )
                )

        _to(engine, "head")
        tables = MetaData()
        tables.reflect(engine)
        datasets = tables.tables["datasets"]
        with engine.connect() as connection:
            rows = connection.execute(
                select(datasets.c.id, datasets.c.active_runs, datasets.c.lapse_check_at)
            ).all()
        found = {name: (count, _utc(bound)) for name, count, bound in rows}
        assert found == {"busy": (2, T0 + timedelta(hours=1)), "idle": (0, None)}

        _to(engine, "0001", down=True)
        tables = MetaData()
        tables.reflect(engine)
        assert "active_runs" not in tables.tables["datasets"].c
    finally:
        engine.dispose()


def test_0003_keeps_the_ledger_append_only_and_refuses_to_drop_corrections(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    try:
        _to(engine, "0003")  # the schema 0003 made (later migrations add required columns)
        tables = MetaData()
        tables.reflect(engine)
        datasets, entries = tables.tables["datasets"], tables.tables["ledger_entries"]
        dataset = {
            "id": "d",
            "description": "",
            "epsilon_cap": 1.0,
            "delta": 1e-5,
            "frozen": False,
            "orders": "[2.0]",
            "posted_units": "[1]",
            "pending_units": "[0]",
            "last_seq": 1,
            "last_hash": "0" * 64,
            "created_at": T0,
            "updated_at": T0,
        }
        entry = {
            "dataset_id": "d",
            "seq": 1,
            "kind": "correction",
            "units": "[1]",
            "actor": "system",
            "epsilon_spent_after": 0.0,
            "epsilon_reserved_after": 0.0,
            "details": "{}",
            "created_at": "2026-01-01T00:00:00.000000Z",
            "prev_hash": "0" * 64,
            "hash": "0" * 64,
        }
        with engine.begin() as connection:
            connection.execute(insert(datasets).values(**dataset))
            connection.execute(insert(entries).values(**entry))
        # The append-only triggers survived the table copy (SQLite) of the kind constraint.
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text("UPDATE ledger_entries SET actor = 'x'"))
        # A correction cannot be kept under the old kinds, nor deleted: no downgrade.
        with pytest.raises(RuntimeError, match="append-only"):
            _to(engine, "0002", down=True)
    finally:
        engine.dispose()


def test_0003_downgrades_an_uncorrected_database(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        _to(engine, "head")
        _to(engine, "0002", down=True)
        tables = MetaData()
        tables.reflect(engine)
        assert "corrections_due" not in tables.tables["datasets"].c
        _to(engine, "head")
    finally:
        engine.dispose()
