"""Leases on holds: a run's unspent hold is released when its lease lapses.

Expiry is lazy: inside the next admission transaction of the dataset, and on
read (a read that finds lapsed holds first runs a small write transaction).
Epochs already charged stay charged; only the unspent part is released.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from accountant.mechanisms import Gaussian, Mechanism, SubsampledGaussian
from service.domain import ledger
from service.domain.budget import Budget, loads_units
from service.domain.errors import DatasetFrozen
from service.storage.models import Dataset, Run, utcnow

SYSTEM_ACTOR = "system"


def epoch_mechanism(run: Run, epochs: int = 1) -> Mechanism:
    """The mechanism `epochs` epochs of a run are charged as (see DESIGN.md §3)."""
    if run.sampling == "shuffle":
        # Each record is in exactly one batch per epoch: one Gaussian step of σ per epoch.
        return Gaussian(run.noise_multiplier, epochs)
    return SubsampledGaussian(run.sample_rate, run.noise_multiplier, run.steps_per_epoch * epochs)


def unspent_units(run: Run) -> tuple[int, list[int]]:
    """(epochs still held, their units): what releasing the run's hold gives back."""
    remaining = max(0, run.epochs - run.epochs_charged)
    return remaining, [remaining * unit for unit in loads_units(run.epoch_units)]


def release(
    session: Session,
    dataset: Dataset,
    budget: Budget,
    run: Run,
    *,
    status: str,
    actor: str,
    now: datetime,
    idempotency_key: str | None = None,
) -> None:
    """End a run: release its unspent hold and append the `release_hold` entry."""
    remaining, units = unspent_units(run)
    budget.release(units)
    run.status = status
    run.updated_at = now
    request = ledger.Append(
        "release_hold",
        actor,
        mechanism=epoch_mechanism(run, remaining) if remaining else None,
        units=units,
        run_id=run.id,
        idempotency_key=idempotency_key,
        details={"reason": status, "epochs_released": remaining},
    )
    ledger.append(session, dataset, budget, request, now)


def expire(session: Session, dataset: Dataset, budget: Budget, now: datetime) -> int:
    """Expire every lapsed hold of a locked dataset; returns how many."""
    statement = (
        select(Run)
        .where(Run.dataset_id == dataset.id, Run.status == "active", Run.expires_at <= now)
        .order_by(Run.expires_at, Run.id)
        .execution_options(populate_existing=True)
    )
    runs = list(session.execute(statement).scalars())
    for run in runs:
        release(session, dataset, budget, run, status="expired", actor=SYSTEM_ACTOR, now=now)
    return len(runs)


def has_lapsed(session: Session, dataset_id: str, now: datetime) -> bool:
    """Whether the dataset has an active run whose lease has lapsed."""
    statement = (
        select(Run.id)
        .where(Run.dataset_id == dataset_id, Run.status == "active", Run.expires_at <= now)
        .limit(1)
    )
    return session.execute(statement).first() is not None


def datasets_with_lapsed(session: Session, now: datetime) -> list[str]:
    """Ids of datasets with at least one lapsed hold."""
    statement = (
        select(Run.dataset_id)
        .where(Run.status == "active", Run.expires_at <= now)
        .distinct()
        .order_by(Run.dataset_id)
    )
    return list(session.execute(statement).scalars())


def begin(session: Session, dataset: Dataset, *, charging: bool = True) -> tuple[datetime, Budget]:
    """Start an admission on a locked dataset: the time, its budget with lapsed holds expired.

    With `charging`, a frozen dataset refuses the admission outright.
    """
    now = utcnow()
    budget = Budget.of(dataset)
    expire(session, dataset, budget, now)
    if charging and dataset.frozen:
        raise DatasetFrozen(f"dataset {dataset.id!r} is frozen")
    return now, budget
