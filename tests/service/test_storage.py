"""What an admission asks of the database, and how the connection pool and read snapshots behave.

The statement lists are the performance design in testable form (docs/benchmarks.md, "Load"):
an admission reads and writes a fixed set of rows, whatever the dataset's history or number of
runs — no count over `runs`, no scan for lapsed leases before one can have lapsed, no lookup
outside the transaction but the API key's (and a plan's δ, so that σ is calibrated before the
dataset is locked).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError

from service.domain import ledger
from service.storage import database as database_module
from service.storage.database import Database, stage_row, stage_update
from service.storage.models import Dataset, IdempotencyRecord, Run, utcnow
from tests.service.conftest import Api

PLAN = {"sample_rate": 0.01, "steps_per_epoch": 20, "epochs": 2, "noise_multiplier": 1.5}
RELEASE = {"mechanism": "laplace", "epsilon": 0.01}


@contextmanager
def _statements(api: Api) -> Iterator[list[str]]:
    """The verb and table of every statement the app sends while the block runs."""
    database: Database = api.client.app.state.db  # type: ignore[union-attr]
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        words = statement.replace('"', "").split()
        verb = words[0].upper()
        if verb in ("BEGIN", "SAVEPOINT", "RELEASE"):
            return
        table = {"SELECT": "FROM", "INSERT": "INTO", "UPDATE": "UPDATE"}.get(verb)
        seen.append(f"{verb} {words[words.index(table) + 1] if table in words else '?'}")

    engines = {database.write_engine, database.read_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


KEY = "SELECT api_keys"
LOCK = ["SELECT datasets", "SELECT idempotency_records"]
STORE = ["UPDATE datasets", "INSERT idempotency_records", "INSERT ledger_entries"]


def _keyed(api: Api, path: str, body: Any, key: str) -> dict[str, Any]:
    response = api.post(path, body, headers={"Idempotency-Key": key})
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


def test_admissions_touch_a_fixed_set_of_rows_whatever_the_history(api: Api) -> None:
    api.create_dataset("d", 1000.0)
    trainer = api.as_key(api.new_key("trainer"))
    expected = {
        "plan": [KEY, "SELECT datasets", *LOCK, *STORE, "INSERT runs"],  # δ, to calibrate
        "epoch": [KEY, *LOCK, "SELECT runs", *STORE, "UPDATE runs"],
        "release": [KEY, *LOCK, *STORE, "INSERT releases"],
        "complete": [KEY, *LOCK, "SELECT runs", *STORE, "UPDATE runs"],
    }
    for cycle in range(12):  # history grows; three runs stay active throughout
        with _statements(trainer) as plan:
            run = _keyed(trainer, "/v1/datasets/d/runs", PLAN, f"p{cycle}")
        with _statements(trainer) as epoch:
            _keyed(trainer, f"/v1/runs/{run['id']}/epochs", None, f"e{cycle}")
        with _statements(trainer) as release:
            _keyed(trainer, "/v1/datasets/d/releases", RELEASE, f"r{cycle}")
        complete: list[str] = []
        if cycle >= 3:
            with _statements(trainer) as complete:
                _keyed(trainer, f"/v1/runs/{run['id']}/complete", None, f"c{cycle}")
        found = {"plan": plan, "epoch": epoch, "release": release, "complete": complete}
        for name, statements in found.items():
            if statements or name != "complete":
                # The key is looked up at most once per request, and not at all while the
                # process's key cache trusts it (LEDGER_KEY_CACHE_SECONDS).
                assert statements.count(KEY) <= 1, (cycle, name, statements)
                seen = sorted(s for s in statements if s != KEY)
                assert seen == sorted(s for s in expected[name] if s != KEY), (cycle, name)
    assert trainer.get("/v1/datasets/d").json()["active_runs"] == 3


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_admissions_dataset_row_goes_in_the_round_trip_of_its_staged_rows(api: Api) -> None:
    """The dataset row an admission changes (seq, hash, curves) is written with the staged rows,
    in pipeline mode, not by a flush of its own at the commit (one round trip fewer under the
    lock); its figures are stored all the same."""
    api.create_dataset("d", 10.0)
    trainer = api.as_key(api.new_key("trainer"))
    run = _keyed(trainer, "/v1/datasets/d/runs", PLAN, "p")
    database: Database = api.client.app.state.db  # type: ignore[union-attr]
    sent: list[tuple[str, bool]] = []

    def record(connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        pipelined = connection.connection.driver_connection.pgconn.pipeline_status != 0
        sent.append((" ".join(statement.split()[:2]), pipelined))

    event.listen(database.write_engine, "before_cursor_execute", record)
    try:
        epoch = _keyed(trainer, f"/v1/runs/{run['id']}/epochs", None, "e")
    finally:
        event.remove(database.write_engine, "before_cursor_execute", record)
    writes = [(s, p) for s, p in sent if s.split()[0] in ("UPDATE", "INSERT")]
    assert ("UPDATE datasets", True) in writes, sent
    assert all(pipelined for _, pipelined in writes), writes
    stored = trainer.get("/v1/datasets/d").json()
    assert stored["ledger_seq"] == epoch["ledger_seq"]
    assert stored["epsilon_spent"] == epoch["dataset"]["epsilon_spent"] > 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_connection_dropped_while_idle_is_replaced_before_use(
    api: Api, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.create_dataset("d", 10.0)

    def drop_pooled_connections() -> None:
        with database.write() as session:
            session.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )

    # Idle for longer than IDLE_PING_S: pinged at checkout, the dead connection is replaced.
    monkeypatch.setattr(database_module, "IDLE_PING_S", 0.0)
    drop_pooled_connections()
    assert api.post("/v1/datasets/d/releases", RELEASE).status_code == 201

    # Back from use moments ago: not pinged, so a connection dropped meanwhile fails its
    # request (503, nothing written); the pool is replaced and the retry succeeds.
    monkeypatch.setattr(database_module, "IDLE_PING_S", 3600.0)
    drop_pooled_connections()
    failed = api.post("/v1/datasets/d/releases", RELEASE, headers={"Idempotency-Key": "k"})
    assert failed.status_code == 503, failed.text
    retried = api.post("/v1/datasets/d/releases", RELEASE, headers={"Idempotency-Key": "k"})
    assert retried.status_code == 201, retried.text
    assert "Idempotent-Replayed" not in retried.headers
    assert api.get("/v1/datasets/d").json()["ledger_seq"] == 3


def test_a_read_transaction_sees_one_snapshot(api: Api, database: Database) -> None:
    api.create_dataset("d", 10.0)
    assert api.post("/v1/datasets/d/releases", RELEASE).status_code == 201
    with database.read() as session:
        dataset = session.get(Dataset, "d")
        assert dataset is not None and dataset.last_seq == 2
        # An admission commits between the read of the dataset and the read of its entries.
        assert api.post("/v1/datasets/d/releases", RELEASE).status_code == 201
        verification = ledger.verify(session, dataset)
    assert verification.ok, verification.problems
    assert verification.entries == 2


def test_lookups_do_not_open_transactions(database: Database) -> None:
    """On PostgreSQL a lookup is one statement in autocommit: no BEGIN and no ROLLBACK."""
    sent: list[str] = []
    with database.lookup() as session:
        connection = session.connection()
        dbapi = connection.connection.dbapi_connection
        event.listen(connection, "before_cursor_execute", lambda *a: sent.append(a[2]))
        session.execute(text("SELECT 1"))
        if not database.is_sqlite:
            assert dbapi is not None and dbapi.autocommit is True
            assert dbapi.info.transaction_status == 0  # IDLE: no transaction was begun
    assert sent == ["SELECT 1"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("workers", [1, 2])
def test_sqlite_writers_queue_instead_of_polling(
    migrated_url: str, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Each writer holds the database lock for longer than the busy timeout: polled through
    SQLite's busy handler, the others would fail with "database is locked"; queued, every one
    of them commits, one after another. Two `Database`s stand for two worker processes: each
    has its own in-process lock, and they meet on the `-writers` file's flock, as processes do
    (flock locks belong to open files, not to processes)."""
    monkeypatch.setattr(database_module, "SQLITE_BUSY_TIMEOUT_MS", 20)
    databases = [Database(migrated_url) for _ in range(workers)]
    held: list[tuple[float, float]] = []

    def write(database: Database) -> None:
        with database.write() as session:
            session.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: the lock is taken here
            started = time.monotonic()
            time.sleep(0.05)
            held.append((started, time.monotonic()))

    try:
        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(write, databases[i % workers]) for i in range(8)]:
                future.result()
    finally:
        for database in databases:
            database.dispose()
    spans = sorted(held)
    assert len(spans) == 8
    assert all(end <= next_start for (_, end), (next_start, _) in pairwise(spans))


def test_staged_updates_are_written_before_anything_reads_and_the_last_change_wins(
    api: Api, database: Database
) -> None:
    """`stage_update` (an epoch's run row) defers its UPDATE to the commit, but every statement
    of the transaction sees it: a query that reads the row (a scan for lapsed leases, say) and
    a reload over the identity map (populate_existing) find the staged values, and a change
    made through the ORM before or after a staged one is ordered as it was made."""
    api.create_dataset("d", 10.0)
    run_id = api.post("/v1/datasets/d/runs", PLAN).json()["id"]
    later = utcnow() + timedelta(days=3)
    with database.write() as session:
        run = session.get(Run, run_id)
        assert run is not None and run.epochs_charged == 0
        stage_update(session, run, epochs_charged=1, expires_at=later)
        # Read back by a statement, and over the identity map: the staged values, not the row's.
        found = session.execute(select(Run.epochs_charged, Run.expires_at).where(Run.id == run_id))
        assert found.one() == (1, later)
        reloaded = session.execute(
            select(Run).where(Run.id == run_id).execution_options(populate_existing=True)
        ).scalar_one()
        assert reloaded is run and run.epochs_charged == 1
        run.status = "completed"  # through the ORM, after a staged change: both written
        stage_update(session, run, epochs_charged=2)
        run.epochs_charged = 3  # through the ORM, after a staged change of the same column
    with database.read() as session:
        stored = session.get(Run, run_id)
        assert stored is not None
        assert (stored.epochs_charged, stored.status, stored.expires_at) == (3, "completed", later)
    with database.write() as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.epochs_charged = 4  # through the ORM, then superseded by a staged change
        stage_update(session, run, epochs_charged=5)
    with database.read() as session:
        stored = session.get(Run, run_id)
        assert stored is not None and stored.epochs_charged == 5
    with database.rehearsal() as session:  # a dry run's staged changes are rolled back
        run = session.get(Run, run_id)
        assert run is not None
        stage_update(session, run, epochs_charged=6)
        session.execute(select(Run.id))
    with database.read() as session:
        stored = session.get(Run, run_id)
        assert stored is not None and stored.epochs_charged == 5


def test_a_staged_row_refused_by_the_database_raises_sqlalchemys_error(
    api: Api, database: Database
) -> None:
    """Staged rows go in one round trip on PostgreSQL (pipeline mode), where the database's
    refusal arrives when the pipeline ends: it is raised as SQLAlchemy's IntegrityError all the
    same (the pipeline decides a batch again one by one on it: a race on an Idempotency-Key)."""
    api.create_dataset("d", 10.0)
    record = {
        "holder": "someone",
        "key": "k",
        "request_hash": "h",
        "status_code": 201,
        "response_body": "{}",
        "created_at": utcnow(),
    }
    with database.write() as session:
        stage_row(session, IdempotencyRecord, dict(record))
    with pytest.raises(IntegrityError), database.write() as session:
        stage_row(session, IdempotencyRecord, dict(record))
    with database.read() as session:  # the transaction was rolled back; the database answers
        assert session.execute(select(IdempotencyRecord.key)).scalars().all() == ["k"]
