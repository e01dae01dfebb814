"""Engines, sessions and the transaction discipline of every admission.

SQLite (the embedded default): WAL, a busy timeout, and `BEGIN IMMEDIATE`
for every write transaction, so writers serialise on the database lock from
the start of the transaction (no upgrade deadlocks, across processes too).
Writers first queue (`WriterQueue`): on a lock of their process, then on an
exclusive flock of `<database file>-writers` shared by every process, so no
writer waits in SQLite's busy handler, which polls with sleeps of up to
100 ms: without the queue, under load, a writer could sleep through many
others' commits (1 worker, 8 clients: p99 0.7 s; 49 ms with it). The kernel
drops a killed process's flock.
Reads use a second engine with ordinary deferred transactions, which WAL lets
run beside a writer.

PostgreSQL: one connection pool; a write transaction locks the rows of the
datasets it admits to with `SELECT … FOR UPDATE`, in id order (populate_existing,
so the ORM sees the locked rows' current values, not a stale identity-map copy),
or with `SKIP LOCKED` to take only those no other transaction holds.
Rows of the append-only tables (releases, ledger entries, idempotency records)
are staged (`stage`, `stage_row`) and written when the transaction commits, one
multi-row INSERT per table (`write_staged`), without the ORM's unit of work; so
are the hot path's updates of rows the transaction loaded (`stage_update`: an
epoch's run; and the locked dataset rows, whose changes made through the ORM are
turned into staged updates when the transaction writes), one executemany per
table. On PostgreSQL they all go in one round trip (psycopg's pipeline mode), and
the commit flushes nothing more. Read transactions are
REPEATABLE READ, so a read of several statements (a dataset and its entries,
when verifying) sees one snapshot, as a SQLite read transaction does.

Every round trip to PostgreSQL costs the service about 0.1 ms of CPU, so the
ones that buy nothing are avoided: a single-statement lookup (`lookup`, e.g.
the API key of every request) runs in autocommit (no BEGIN, no ROLLBACK), and
a pooled connection is pinged before use only when it has been idle for a
while (`IDLE_PING_S`), not on every checkout. A connection that broke while
in use fails its request (503) and SQLAlchemy then replaces the whole pool.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows: there, only a process's own writers queue
    fcntl = None  # type: ignore[assignment]

from sqlalchemy import (
    Engine,
    Table,
    Update,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.pool import ConnectionPoolEntry

from service.storage.models import Base, Dataset, IdempotencyRecord, LedgerEntry, Release

_STAGED = "staged_rows"
_UPDATES = "staged_updates"
# Staged rows go in this order (a ledger entry names its release); new runs, added through
# the ORM, are flushed before any of them.
_STAGED_TABLES: tuple[Table, ...] = (
    Release.__table__,
    LedgerEntry.__table__,
    IdempotencyRecord.__table__,  # type: ignore[assignment]
)

SQLITE_BUSY_TIMEOUT_MS = 60_000
IDLE_PING_S = 2.0


class Database:
    """The service's handle on its store: write and read transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            self.write_engine = _sqlite_engine(url, immediate=True)
            self.read_engine = _sqlite_engine(url, immediate=False)
            lookup_engine = self.read_engine
        else:
            self.write_engine = _postgres_engine(url)
            self.read_engine = self.write_engine.execution_options(
                isolation_level="REPEATABLE READ"
            )
            lookup_engine = self.write_engine.execution_options(isolation_level="AUTOCOMMIT")
        self._writer = sessionmaker(self.write_engine, expire_on_commit=False)
        event.listen(self._writer, "do_orm_execute", _updates_first)
        self._reader = sessionmaker(self.read_engine, expire_on_commit=False)
        self._lookup = sessionmaker(lookup_engine, expire_on_commit=False)
        # SQLite: writers queue here (in this process, then across processes) before they ask
        # for the database lock, so none waits in SQLite's sleeping busy handler.
        self._queue: AbstractContextManager[Any] = (
            WriterQueue(parsed.database) if self.is_sqlite else nullcontext()
        )

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, committed when the block ends (staged rows written first);
        rolled back on any exception."""
        with self._queue, self._writer() as session, session.begin():
            yield session
            write_staged(session)

    @contextmanager
    def rehearsal(self) -> Iterator[Session]:
        """A write transaction that is always rolled back (dry runs: same locks, no effect).

        The rows it loaded or made are detached first, as they were at the end of the block,
        so a dry run's result can be read after the rollback (a rollback would expire them).
        """
        with self._queue, self._writer() as session:
            session.begin()
            try:
                yield session
            finally:
                session.expunge_all()
                session.rollback()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction, ended (not committed) when the block exits.

        Closing, rather than rolling back, leaves the loaded rows readable after
        the block: they are detached with their attributes, not expired.
        """
        with self._reader() as session:
            yield session

    @contextmanager
    def lookup(self) -> Iterator[Session]:
        """A session for one reading statement: in autocommit on PostgreSQL (no transaction to
        begin or end), an ordinary read transaction on SQLite."""
        with self._lookup() as session:
            yield session

    def ping(self) -> None:
        """One trivial statement through a read transaction; raises if the store is unreachable."""
        with self.read() as session:
            session.execute(text("SELECT 1"))

    def lock_dataset(self, session: Session, dataset_id: str) -> Dataset | None:
        """The dataset row, locked for the rest of this write transaction (None if absent)."""
        return self.lock_datasets(session, [dataset_id]).get(dataset_id)

    def lock_datasets(
        self, session: Session, dataset_ids: list[str], *, skip_locked: bool = False
    ) -> dict[str, Dataset]:
        """The dataset rows of `dataset_ids` (those that exist), locked for the rest of this
        write transaction in id order, so two transactions that lock several never deadlock.

        With `skip_locked` (PostgreSQL), rows another transaction holds are left out rather
        than waited for. SQLite: BEGIN IMMEDIATE already holds the whole database.
        """
        statement = select(Dataset).where(Dataset.id.in_(dataset_ids)).order_by(Dataset.id)
        if not self.is_sqlite:
            statement = statement.with_for_update(skip_locked=skip_locked)
        rows = session.execute(statement.execution_options(populate_existing=True)).scalars()
        return {row.id: row for row in rows}

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()


def stage(session: Session, row: Base) -> None:
    """Queue a new row object of an append-only table (see `stage_row`)."""
    table = row.__table__
    stage_row(
        session, type(row), {column.key: getattr(row, column.key) for column in table.columns}
    )


def stage_row(session: Session, model: type[Base], values: dict[str, Any]) -> None:
    """Queue a new row of an append-only table (a release, a ledger entry, an idempotency
    record): the rows of one transaction go in one multi-row INSERT per table when it commits
    (`write_staged`), without the ORM's unit of work. `values` has every column; nothing in the
    transaction reads these rows back before the commit, except what calls `write_staged`
    first."""
    name = model.__tablename__
    session.info.setdefault(_STAGED, {}).setdefault(name, []).append(values)


def stage_update(session: Session, row: Base, **values: Any) -> None:
    """Set columns of a row the transaction loaded, and write them when it commits with the
    other staged updates of its table: one executemany per table and set of columns
    (`write_staged`), without the ORM's unit of work, which costs the hot path (an epoch's run)
    more than the statement. The values are set on the row at once, as committed values: a
    change made earlier through the ORM to the same column is superseded, one made later is
    flushed after the staged updates, so the last change wins either way. A row not yet in the
    database (pending) is changed through the ORM as usual."""
    state = inspect(row)
    if not state.persistent:
        for name, value in values.items():
            setattr(row, name, value)
        return
    for name, value in values.items():
        set_committed_value(row, name, value)
    updates = session.info.setdefault(_UPDATES, {})
    updates.setdefault((type(row), state.identity), {}).update(values)


def write_staged(session: Session) -> None:
    """Write every update and insert staged in this transaction so far, and the ORM's own
    changes: the staged updates before the ORM's (see `stage_update`), and the staged rows
    after any new row the ORM adds (a new dataset's first entry names it). On PostgreSQL the
    staged statements go in one round trip (psycopg's pipeline mode), with the new rows too
    when the ORM adds none (an epoch, a release): they are written under the datasets' locks."""
    _stage_dirty_datasets(session)
    updates = session.info.pop(_UPDATES, None)
    staged: dict[str, list[dict[str, Any]]] | None = session.info.pop(_STAGED, None)
    if not updates and not staged:
        return
    connection = session.connection()
    adds = bool(session.new)  # a new set of the pending rows each time it is read
    if updates or not adds:
        with _pipelined(connection):
            if updates:
                _write_updates(connection, updates)
            if staged and not adds:
                _insert_staged(connection, staged)
                staged = None
    if staged:
        session.flush()
        with _pipelined(connection):
            _insert_staged(connection, staged)


def _stage_dirty_datasets(session: Session) -> None:
    """Turn the changes the transaction made to dataset rows through the ORM (an admission's
    new last seq and hash, its curves) into staged updates (`stage_update`), so they go in
    the pipelined round trip with the staged rows rather than in a flush of their own at the
    commit. Dataset rows have plain columns only (no version counter, no onupdate)."""
    for row in session.dirty:
        if type(row) is not Dataset:
            continue
        state = inspect(row)
        changed = {}
        for attribute in state.mapper.column_attrs:
            added = state.attrs[attribute.key].history.added
            if added:
                changed[attribute.key] = added[0]
        if changed:
            stage_update(session, row, **changed)


def _insert_staged(connection: Connection, staged: dict[str, list[dict[str, Any]]]) -> None:
    for table in _STAGED_TABLES:
        rows = staged.get(table.name)
        if rows:
            connection.execute(insert(table), rows)


@contextmanager
def _pipelined(connection: Connection) -> Iterator[None]:
    """psycopg's pipeline mode around the block on PostgreSQL (its statements are sent without
    waiting for each one's result; errors are raised when the block ends, as SQLAlchemy's)."""
    driver = connection.connection.driver_connection
    pipeline = getattr(driver, "pipeline", None)
    if pipeline is None:  # SQLite: no round trips to save
        yield
        return
    try:
        with pipeline():
            yield
    except DBAPIError:
        raise
    except connection.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(
            None, None, exc, connection.dialect.loaded_dbapi.Error, dialect=connection.dialect
        ) from exc


def _updates_first(state: ORMExecuteState) -> None:
    """Before any statement of a write transaction: its staged updates (`stage_update`), so
    that what it reads, and the ORM's autoflush that follows, see them."""
    updates = state.session.info.pop(_UPDATES, None)
    if updates:
        _write_updates(state.session.connection(), updates)


def _write_updates(
    connection: Connection, updates: dict[tuple[type[Base], tuple[Any, ...]], dict[str, Any]]
) -> None:
    grouped: dict[tuple[type[Base], tuple[str, ...]], list[dict[str, Any]]] = {}
    for (model, identity), values in updates.items():
        keys = inspect(model).primary_key
        names = tuple(sorted(values))
        parameters = {f"_pk_{key.key}": part for key, part in zip(keys, identity, strict=True)}
        parameters.update({f"_set_{name}": value for name, value in values.items()})
        grouped.setdefault((model, names), []).append(parameters)
    # On the connection: the session's execute would flush the ORM's changes first, and a
    # later change would then be overwritten by an earlier staged one.
    for (model, names), rows in grouped.items():
        connection.execute(_update_statement(model, names), rows)


@lru_cache(maxsize=64)
def _update_statement(model: type[Base], names: tuple[str, ...]) -> Update:
    table: Table = model.__table__  # type: ignore[assignment]
    keys = inspect(model).primary_key
    return (
        update(table)
        .where(*(key == bindparam(f"_pk_{key.key}") for key in keys))
        .values({name: bindparam(f"_set_{name}") for name in names})
    )


class WriterQueue:
    """Where SQLite writers wait their turn before `BEGIN IMMEDIATE`: a lock of the process,
    then, for a database file, an exclusive `flock` on `<file>-writers` that the other
    processes' writers wait on. Both wake a waiter the moment the holder is done, where SQLite's
    busy handler would let it sleep on (up to 100 ms a try). Reentrant within a thread."""

    def __init__(self, database: str | None) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._file: int | None = None
        in_memory = not database or database == ":memory:" or database.startswith("file:")
        self._path = None if in_memory or fcntl is None else f"{database}-writers"

    def __enter__(self) -> None:
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1 and self._path is not None:
            try:
                self._file = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._file, fcntl.LOCK_EX)
            except BaseException:
                self._release()
                raise

    def __exit__(self, *_: object) -> None:
        self._release()

    def _release(self) -> None:
        if self._depth == 1 and self._file is not None:
            os.close(self._file)  # releases the flock
            self._file = None
        self._depth -= 1
        self._lock.release()


def _postgres_engine(url: str) -> Engine:
    engine = create_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800)

    @event.listens_for(engine, "checkin")
    def _stamp(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        # A connection back from use moments ago is alive; one idle for a while may have been
        # dropped (a database restart, a proxy's idle timeout): ping it, and if the ping fails
        # the pool discards it and checks out another (up to three tries, then a new one).
        idle = time.monotonic() - record.info.get("checked_in", time.monotonic())
        if idle > IDLE_PING_S:
            try:
                engine.dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise DisconnectionError(str(exc)) from exc

    return engine


def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        pool_size=8,
        max_overflow=16,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # FULL: an acknowledged charge survives a power cut, not only a process crash.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
