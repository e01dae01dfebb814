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
from functools import lru_cache

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from accountant import calibrate, exact
from accountant.mechanisms import Gaussian, Mechanism, SubsampledGaussian
from accountant.members import PureTotal, pure_total
from service.domain import ledger
from service.domain.budget import Budget, Cost, dumps_units, loads_units
from service.domain.errors import DatasetFrozen
from service.storage.database import stage_update
from service.storage.models import Dataset, Run, utcnow

# The service itself (lapsed leases, corrections): fixed values, documented in docs/api.md.
SYSTEM_ACTOR = ledger.Actor("system", "ledger service", "system")
# A shuffle epoch's sensitivity in clipping norms: adding a record to fixed-size shuffled
# batches substitutes it for one record of one batch (docs/accounting.md §1, "Shuffled
# batches"), so its noisy sum moves by up to 2C, not C.
SHUFFLE_SENSITIVITY = 2.0
_SHUFFLE_REASON = (
    "shuffle epochs were charged as one Gaussian step of noise multiplier σ (sensitivity C); "
    "with fixed-size shuffled batches adding a record is a substitution in one batch "
    "(sensitivity 2C), so each epoch costs Gaussian(σ/2): docs/accounting.md §1"
)


def epoch_mechanism(run: Run, epochs: int = 1) -> Mechanism:
    """The mechanism `epochs` epochs of a run are charged as (see DESIGN.md §3)."""
    return _mechanism(
        run.sampling, run.sample_rate, run.noise_multiplier, run.steps_per_epoch * epochs, epochs
    )


@lru_cache(maxsize=1024)
def _mechanism(
    sampling: str, sample_rate: float, noise_multiplier: float, steps: int, epochs: int
) -> Mechanism:
    # Built (and validated) once per run shape: every epoch of a run is charged as the same.
    if sampling == "shuffle":
        # One substitution in one batch per epoch: one Gaussian step of sensitivity 2C.
        return Gaussian(noise_multiplier / SHUFFLE_SENSITIVITY, epochs)
    return SubsampledGaussian(sample_rate, noise_multiplier, steps)


def epoch_cost(run: Run) -> Cost:
    """One epoch's cost: its stored units and the pure part of its mechanism (a run's hold is
    `epochs ×` this, so charging and releasing subtract it exactly)."""
    return _epoch_cost(run.epoch_units, epoch_mechanism(run))


@lru_cache(maxsize=1024)
def _epoch_cost(epoch_units: str, mechanism: Mechanism) -> Cost:
    # Every epoch of a run costs the same (a Cost is never changed: sums make new lists).
    return Cost(loads_units(epoch_units), pure_total(mechanism))


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
    actor: ledger.Actor,
    now: datetime,
    idempotency_key: str | None = None,
) -> ledger.Written:
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


def charge_epoch(session: Session, dataset: Dataset, run: Run, now: datetime) -> None:
    """Count one more epoch charged to a run and renew its lease from `now` (the dataset's bound
    still holds unless a clock went backwards). The run's row is updated with the batch's other
    epochs in one statement (`stage_update`): this runs once per epoch, under the lock."""
    expires_at = now + timedelta(seconds=run.lease_seconds)
    stage_update(
        session, run, epochs_charged=run.epochs_charged + 1, expires_at=expires_at, updated_at=now
    )
    _cover(dataset, expires_at)


def _cover(dataset: Dataset, expires_at: datetime) -> None:
    if dataset.lapse_check_at is None or expires_at < dataset.lapse_check_at:
        dataset.lapse_check_at = expires_at


def may_have_lapsed(dataset: Dataset, now: datetime) -> bool:
    """Whether a hold of the dataset may have lapsed by `now` (False: certainly none has)."""
    return dataset.lapse_check_at is not None and dataset.lapse_check_at <= now


def due(dataset: Dataset, now: datetime) -> bool:
    """Whether a write transaction has work on the dataset: corrections owed or a lapsed hold."""
    return dataset.corrections_due or may_have_lapsed(dataset, now)


def correct(session: Session, dataset: Dataset, budget: Budget, now: datetime) -> int:
    """Top up, on a locked dataset flagged `corrections_due`, every shuffle run whose stored
    epoch units are below its epoch mechanism's; returns how many runs were corrected.

    Nothing is rewritten: a `correction` entry posts the difference for every epoch already
    charged, a `hold_top_up` entry holds it for every epoch an active run still holds. Both
    are forced (those epochs ran or were admitted already), so the dataset may end above its
    cap: that is then its honest figure, and nothing new is admitted.
    """
    if not dataset.corrections_due:
        return 0
    statement = (
        select(Run)
        .where(Run.dataset_id == dataset.id, Run.sampling == "shuffle")
        .order_by(Run.id)
        .execution_options(populate_existing=True)
    )
    corrected = 0
    for run in session.execute(statement).scalars():
        before = loads_units(run.epoch_units)
        # Per order the larger: an order charged above the new curve keeps its charge.
        fresh = budget.cost_of(epoch_mechanism(run)).units
        after = [max(old, new) for old, new in zip(before, fresh, strict=True)]
        if after == before:
            continue
        corrected += 1
        _correct_run(session, dataset, budget, run, before, after, now)
    dataset.corrections_due = False
    return corrected


def _correct_run(
    session: Session,
    dataset: Dataset,
    budget: Budget,
    run: Run,
    before: list[int],
    after: list[int],
    now: datetime,
) -> None:
    step = exact.subtract(after, before)
    details = {
        "reason": _SHUFFLE_REASON,
        "charged_before": Gaussian(run.noise_multiplier, 1).params(),
        "epsilon_before": run.epsilon,
    }
    # The epochs were counted as non-pure items when first held and charged; a top-up adds
    # curve only (datasets due a correction predate the pure-sum member anyway).
    if run.epochs_charged:
        cost = Cost([run.epochs_charged * unit for unit in step], PureTotal())
        budget.charge(cost, from_hold=False)
        correction = ledger.Append(
            "correction",
            SYSTEM_ACTOR,
            mechanism=epoch_mechanism(run, run.epochs_charged),
            cost=cost,
            run_id=run.id,
            details={**details, "epochs": run.epochs_charged},
        )
        ledger.append(session, dataset, budget, correction, now)
    remaining = max(0, run.epochs - run.epochs_charged) if run.status == "active" else 0
    if remaining:
        cost = Cost([remaining * unit for unit in step], PureTotal())
        budget.hold(cost)
        top_up = ledger.Append(
            "hold_top_up",
            SYSTEM_ACTOR,
            mechanism=epoch_mechanism(run, remaining),
            cost=cost,
            run_id=run.id,
            details={**details, "epochs": remaining},
        )
        ledger.append(session, dataset, budget, top_up, now)
    run.epoch_units = dumps_units(after)
    # The run's own ε (same figures as a fresh plan: runs.calibrate_plan, q = 1).
    sigma = run.noise_multiplier / SHUFFLE_SENSITIVITY
    run.epsilon = calibrate.dp_sgd_epsilon(sigma, dataset.delta, 1.0, run.epochs)
    run.epsilon_per_epoch = calibrate.dp_sgd_epsilon(sigma, dataset.delta, 1.0, 1)
    run.updated_at = now


def expire(session: Session, dataset: Dataset, budget: Budget, now: datetime) -> int:
    """Bring a locked dataset's holds up to date: the corrections it owes first (`correct`),
    then expire every lapsed hold; returns how many expired.

    Looks at the runs only once the dataset's lapse bound is reached, and then
    moves the bound to the earliest lease still running. Corrections come first so
    that a lapsed hold releases what its (corrected) run holds.
    """
    correct(session, dataset, budget, now)
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


def datasets_due(session: Session, now: datetime) -> list[str]:
    """Ids of datasets owing corrections or that may have a lapsed hold (see `due`)."""
    statement = (
        select(Dataset.id)
        .where(or_(Dataset.corrections_due, Dataset.lapse_check_at <= now))
        .order_by(Dataset.id)
    )
    return list(session.execute(statement).scalars())


def begin(session: Session, dataset: Dataset, *, charging: bool = True) -> tuple[datetime, Budget]:
    """Start an admission on a locked dataset: the time, its budget with owed corrections
    appended and lapsed holds expired.

    With `charging`, a frozen dataset refuses the admission outright.
    """
    now = utcnow()
    budget = _current_budget(session, dataset)
    expire(session, dataset, budget, now)
    if charging and dataset.frozen:
        raise DatasetFrozen(f"dataset {dataset.id!r} is frozen")
    return now, budget


def _current_budget(session: Session, dataset: Dataset) -> Budget:
    """The dataset's budget, kept across the admissions of one transaction (a batch) while it
    is current: parsed from the row once, not once per admission. Any entry appended through
    another Budget moves the dataset's last seq past the kept one, which is then read afresh."""
    key = ("budget", dataset.id)
    kept: Budget | None = session.info.get(key)
    if (
        kept is not None
        and kept.seq == dataset.last_seq
        and kept.filter.epsilon_cap == dataset.epsilon_cap
    ):
        return kept
    budget = Budget.of(dataset)
    session.info[key] = budget
    return budget
