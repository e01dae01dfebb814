"""Leases on holds: a run's unspent hold is released when its lease lapses.

Expiry is lazy: inside the next admission transaction of the dataset, and on
read (a read that finds lapsed holds first runs a small write transaction).
Epochs already charged stay charged; only the unspent part is released.

The dataset row keeps `active_runs` exact and `lapse_check_at` as a lower
bound on its active runs' lease ends: a new run lowers it, a renewed lease
leaves it (still a bound), and only when it is reached are the runs looked at
— the lapsed ones expired and the bound set to the earliest lease left. An
admission before the bound asks `runs` nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from accountant.mechanisms import Gaussian, Mechanism, SubsampledGaussian
from accountant.members import pure_total
from service.domain import ledger
from service.domain.budget import Budget, Cost, loads_units
from service.domain.errors import DatasetFrozen
from service.storage.models import Dataset, LedgerEntry, Run, utcnow

SYSTEM_ACTOR = "system"


def epoch_mechanism(run: Run, epochs: int = 1) -> Mechanism:
    """The mechanism `epochs` epochs of a run are charged as (see DESIGN.md §3)."""
    if run.sampling == "shuffle":
        # Each record is in exactly one batch per epoch: one Gaussian step of σ per epoch.
        return Gaussian(run.noise_multiplier, epochs)
    return SubsampledGaussian(run.sample_rate, run.noise_multiplier, run.steps_per_epoch * epochs)


def epoch_cost(run: Run) -> Cost:
    """One epoch's cost: its stored units and the pure part of its mechanism (a run's hold is
    `epochs ×` this, so charging and releasing subtract it exactly)."""
    return Cost(loads_units(run.epoch_units), pure_total(epoch_mechanism(run)))


def unspent(run: Run) -> tuple[int, Cost]:
    """(epochs still held, their cost): what releasing the run's hold gives back."""
    remaining = max(0, run.epochs - run.epochs_charged)
    return remaining, epoch_cost(run).times(remaining)


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
) -> LedgerEntry:
    """End a run: release its unspent hold and append the `release_hold` entry."""
    remaining, cost = unspent(run)
    budget.release(cost)
    run.status = status
    run.updated_at = now
    dataset.active_runs -= 1
    request = ledger.Append(
        "release_hold",
        actor,
        mechanism=epoch_mechanism(run, remaining) if remaining else None,
        cost=cost,
        run_id=run.id,
        idempotency_key=idempotency_key,
        details={"reason": status, "epochs_released": remaining},
    )
    return ledger.append(session, dataset, budget, request, now)


def started(dataset: Dataset, run: Run) -> None:
    """Count a new active run on its (locked) dataset, whose lapse bound must cover its lease."""
    dataset.active_runs += 1
    _cover(dataset, run.expires_at)


def renew(dataset: Dataset, run: Run, now: datetime) -> None:
    """Renew a run's lease from `now` (the bound still holds unless a clock went backwards)."""
    run.expires_at = now + timedelta(seconds=run.lease_seconds)
    run.updated_at = now
    _cover(dataset, run.expires_at)


def _cover(dataset: Dataset, expires_at: datetime) -> None:
    if dataset.lapse_check_at is None or expires_at < dataset.lapse_check_at:
        dataset.lapse_check_at = expires_at


def may_have_lapsed(dataset: Dataset, now: datetime) -> bool:
    """Whether a hold of the dataset may have lapsed by `now` (False: certainly none has)."""
    return dataset.lapse_check_at is not None and dataset.lapse_check_at <= now


def expire(session: Session, dataset: Dataset, budget: Budget, now: datetime) -> int:
    """Expire every lapsed hold of a locked dataset; returns how many.

    Looks at the runs only once the dataset's lapse bound is reached, and then
    moves the bound to the earliest lease still running.
    """
    if not may_have_lapsed(dataset, now):
        return 0
    active = (Run.dataset_id == dataset.id, Run.status == "active")
    statement = (
        select(Run)
        .where(*active, Run.expires_at <= now)
        .order_by(Run.expires_at, Run.id)
        .execution_options(populate_existing=True)
    )
    runs = list(session.execute(statement).scalars())
    for run in runs:
        release(session, dataset, budget, run, status="expired", actor=SYSTEM_ACTOR, now=now)
    dataset.lapse_check_at = session.execute(
        select(func.min(Run.expires_at)).where(*active, Run.expires_at > now)
    ).scalar_one_or_none()
    return len(runs)


def datasets_with_lapsed(session: Session, now: datetime) -> list[str]:
    """Ids of datasets that may have a lapsed hold (their lapse bound is reached)."""
    statement = select(Dataset.id).where(Dataset.lapse_check_at <= now).order_by(Dataset.id)
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
