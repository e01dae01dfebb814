"""Engines, sessions and the transaction discipline of every admission.

SQLite (the embedded default): WAL, a busy timeout, and `BEGIN IMMEDIATE`
for every write transaction, so writers serialise on the database lock from
the start of the transaction (no upgrade deadlocks, across processes too).
Reads use a second engine with ordinary deferred transactions, which WAL lets
run beside a writer.

PostgreSQL: one engine; a write transaction locks the dataset row with
`SELECT … FOR UPDATE` (populate_existing, so the ORM sees the locked row's
current values, not a stale identity-map copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service.storage.models import Dataset

SQLITE_BUSY_TIMEOUT_MS = 60_000


class Database:
    """The service's handle on its store: write and read transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            self.write_engine = _sqlite_engine(url, immediate=True)
            self.read_engine = _sqlite_engine(url, immediate=False)
        else:
            self.write_engine = create_engine(
                url, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_recycle=1800
            )
            self.read_engine = self.write_engine
        self._writer = sessionmaker(self.write_engine, expire_on_commit=False)
        self._reader = sessionmaker(self.read_engine, expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction; the caller commits. Rolled back on any exception."""
        with self._writer() as session, session.begin():
            yield session

    @contextmanager
    def rehearsal(self) -> Iterator[Session]:
        """A write transaction that is always rolled back (dry runs: same locks, no effect)."""
        with self._writer() as session:
            session.begin()
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction, ended (not committed) when the block exits.

        Closing, rather than rolling back, leaves the loaded rows readable after
        the block: they are detached with their attributes, not expired.
        """
        with self._reader() as session:
            yield session

    def lock_dataset(self, session: Session, dataset_id: str) -> Dataset | None:
        """The dataset row, locked for the rest of this write transaction (None if absent)."""
        statement = select(Dataset).where(Dataset.id == dataset_id)
        if not self.is_sqlite:  # SQLite: BEGIN IMMEDIATE already holds the write lock
            statement = statement.with_for_update()
        statement = statement.execution_options(populate_existing=True)
        return session.execute(statement).scalar_one_or_none()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()


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
