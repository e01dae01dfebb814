"""What probes and scrapes read: whether the store can serve, and each dataset's ε figures.

Here, not in the health routes, because both read the database: a route builds no SQL (the
`routes-no-sql` import contract), and the metrics module lies below the domain.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from service.domain.budget import Budget
from service.metrics import DatasetGauge
from service.storage import migrate
from service.storage.database import Database
from service.storage.models import Dataset


@dataclass(frozen=True)
class Readiness:
    """Whether the service can answer: the database reachable and its schema at head."""

    ready: bool
    revision: str | None
    detail: str = ""


def readiness(db: Database) -> Readiness:
    """Ready iff the database answers and its schema is at the newest migration."""
    try:
        db.ping()
        current = migrate.current_revision(db.read_engine)
    except SQLAlchemyError:
        return Readiness(False, None, "the database is unreachable")
    head = migrate.head_revision()
    if current != head:
        detail = f"database schema at {current}, expected {head}: run `privacy-ledger db upgrade`"
        return Readiness(False, current, detail)
    return Readiness(True, current)


def dataset_gauges(db: Database) -> list[DatasetGauge]:
    """Every dataset's filter ε spent, reserved and its cap, from one read transaction."""
    with db.read() as session:
        gauges = []
        for row in session.execute(select(Dataset)).scalars():
            budget = Budget.of(row)
            gauges.append(
                DatasetGauge(
                    row.id, budget.epsilon_spent(), budget.epsilon_reserved(), row.epsilon_cap
                )
            )
        return gauges
