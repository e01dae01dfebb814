"""DP-SGD runs: a plan is held, each epoch is charged from the hold, the rest released.

The ledger computes σ before the transaction, so that a new plan's calibration
(milliseconds) never holds the dataset's lock: it depends only on the plan and
the dataset's fixed δ, and is memoised (a plan seen before costs nothing); so are the
shares a plan would fix as a `first_admission` dataset's first admission. The
one exception is `fit_remaining`: the smallest σ with which the whole plan fits
what remains of the dataset depends on its state, so it is computed under the
lock (docs/benchmarks.md has its cost). A plan's hold is exactly `epochs ×` one
epoch's cost, so charging every epoch drains it to zero with no remainder. Each run
also shows its PLD ε alone (`run_pld`), which is never computed under the lock.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from accountant import calibrate, exact
from accountant.mechanisms import Mechanism
from accountant.members import MemberFilter, first_admission_shares
from service.domain import holds, ledger, run_pld
from service.domain.budget import Budget, Cost, dumps_units, loads_shares
from service.domain.datasets import DatasetView, refresh, view
from service.domain.errors import (
    BudgetExhausted,
    DatasetFrozen,
    DomainError,
    InvalidRequest,
    NotFound,
    RunNotActive,
)
from service.domain.keys import Principal
from service.domain.memo import memoised
from service.domain.pipeline import Admission, Idempotency, Pipeline
from service.storage.database import Database
from service.storage.models import Dataset, Run


def new_id(prefix: str) -> str:
    """A time-ordered id: sorting ids sorts by creation."""
    return f"{prefix}_{time.time_ns():016x}{secrets.token_hex(4)}"


@dataclass(frozen=True)
class RunSpec:
    """A trainer's plan."""

    sample_rate: float
    steps_per_epoch: int
    epochs: int
    target_epsilon: float | None
    noise_multiplier: float | None
    sampling: str
    max_grad_norm: float | None
    name: str | None
    lease_seconds: int
    fit_remaining: bool = False

    def accounted_shape(self) -> tuple[float, int, float]:
        """(sample rate, steps, sensitivity in clipping norms) one epoch is accounted as.

        Shuffled fixed-size batches are one Gaussian step of sensitivity 2C per epoch, no
        amplification: q = 1, one step of σ/2 (docs/accounting.md §1, "Shuffled batches").
        """
        if self.sampling == "shuffle":
            return 1.0, 1, holds.SHUFFLE_SENSITIVITY
        return self.sample_rate, self.steps_per_epoch, 1.0


@dataclass(frozen=True)
class Calibration:
    """σ for a plan and the plan's own ε (standalone, at the dataset's δ)."""

    noise_multiplier: float
    epsilon: float
    epsilon_per_epoch: float


def calibrate_plan(spec: RunSpec, delta: float) -> Calibration:
    """σ from target_epsilon (or as given), and the plan's ε; InvalidRequest if impossible.

    The mechanism is the one each epoch is charged as (`holds.epoch_mechanism`), so the
    plan's ε and σ match its hold.
    """
    q, steps, sensitivity = spec.accounted_shape()
    return _calibration(
        q, steps, sensitivity, spec.epochs, spec.target_epsilon, spec.noise_multiplier, delta
    )


def fit_plan(spec: RunSpec, budget: Budget) -> Calibration:
    """`fit_remaining`: the smallest σ (1e-5 relative) with which the whole plan fits what
    remains of the (locked) dataset now, holds included; BudgetExhausted if none does."""
    q, steps, sensitivity = spec.accounted_shape()
    try:
        charged = _fitting_sigma(spec, budget)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if charged is None:
        raise BudgetExhausted(
            f"a plan of {spec.epochs} epochs cannot fit what remains of the dataset with any "
            f"noise multiplier up to {calibrate.SIGMA_MAX:g}",
            epsilon_cap=budget.filter.epsilon_cap,
            epsilon_spent=budget.epsilon_spent(),
            epsilon_reserved=budget.epsilon_reserved(),
        )
    # The search admits with the accountant's own curve of the plan; the hold is charged with
    # the mechanism the run is accounted as (holds.epoch_mechanism). Should their units differ
    # in the last bit, step σ up until the very hold the service writes is admitted.
    sigma = charged * sensitivity  # the trainer's σ (noise std / C); exact: a power of two
    nudge = 1e-7
    for _ in range(64):
        if budget.admits(_plan_cost(spec, budget, sigma)):
            delta = budget.filter.delta
            return _calibration(q, steps, sensitivity, spec.epochs, None, sigma, delta)
        sigma *= 1.0 + nudge
        nudge *= 2.0
    # Unreachable unless the two curves disagree by far more than rounding: refuse, never guess.
    raise BudgetExhausted(
        f"no noise multiplier found with which a plan of {spec.epochs} epochs fits",
        epsilon_cap=budget.filter.epsilon_cap,
        epsilon_spent=budget.epsilon_spent(),
        epsilon_reserved=budget.epsilon_reserved(),
    )


def _fitting_sigma(spec: RunSpec, budget: Budget) -> float | None:
    """The smallest charged σ with which the plan fits (None: none up to SIGMA_MAX); on a
    dataset whose shares are not fixed yet, with the shares the plan would fix (a fill's do
    not depend on its σ, so the plan's cost at any σ names them)."""
    q, steps, _ = spec.accounted_shape()
    if budget.shares.unfixed:
        filter_, total = budget.decided_against(_plan_cost(spec, budget, 1.0))
    else:
        filter_, total = budget.filter, exact.add(budget.posted, budget.pending)
    return calibrate.sigma_that_fits(filter_, total, q, steps, spec.epochs)


def _plan_mechanism(spec: RunSpec, sigma: float, epochs: int = 1) -> Mechanism:
    """What `epochs` epochs of the plan with the trainer's σ are charged as."""
    probe = Run(
        sampling=spec.sampling,
        sample_rate=spec.sample_rate,
        steps_per_epoch=spec.steps_per_epoch,
        noise_multiplier=sigma,
    )
    return holds.epoch_mechanism(probe, epochs)


def _plan_cost(spec: RunSpec, budget: Budget, sigma: float) -> Cost:
    shape = _plan_shape(spec, budget, sigma)
    epoch = budget.cost_of(_plan_mechanism(spec, sigma), shape, fill=spec.fit_remaining)
    return epoch.times(spec.epochs)


def _plan_shape(spec: RunSpec, budget: Budget, sigma: float) -> Mechanism | None:
    """What fixes a first_admission dataset's shares when the plan is its first admission: the
    whole plan (None once they are fixed)."""
    return _plan_mechanism(spec, sigma, spec.epochs) if budget.shares.unfixed else None


@memoised(maxsize=4096)
def _calibration(
    q: float,
    steps: int,
    sensitivity: float,
    epochs: int,
    target_epsilon: float | None,
    noise_multiplier: float | None,
    delta: float,
) -> Calibration:
    # σ is the trainer's (noise std / clipping norm); σ / sensitivity is the charged one.
    # Scaling by 2 is exact in binary floating point, so the two round-trip.
    try:
        if target_epsilon is not None:
            charged = calibrate.noise_multiplier(target_epsilon, delta, q, steps * epochs)
            sigma = charged * sensitivity
        else:
            assert noise_multiplier is not None
            sigma = noise_multiplier
            charged = sigma / sensitivity
        epsilon = calibrate.dp_sgd_epsilon(charged, delta, q, steps * epochs)
        per_epoch = calibrate.dp_sgd_epsilon(charged, delta, q, steps)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if not (epsilon < float("inf")):
        raise InvalidRequest("noise_multiplier is too small: this plan's ε is unbounded")
    return Calibration(sigma, epsilon, per_epoch)


@dataclass(frozen=True)
class _Terms:
    """What a plan reads of its dataset before the lock: δ (fixed at creation), and the cap
    and whether the shares are still to be fixed (both may change before the lock: only used
    to compute, outside it, what the admission would otherwise compute under it)."""

    delta: float
    epsilon_cap: float
    unfixed: bool


def _dataset_terms(db: Database, principal: Principal, dataset_id: str) -> _Terms:
    """The dataset's terms, read in one statement outside any transaction."""
    principal.require_dataset(dataset_id)
    with db.lookup() as session:
        row = session.execute(
            select(Dataset.delta, Dataset.epsilon_cap, Dataset.shares).where(
                Dataset.id == dataset_id
            )
        ).one_or_none()
    if row is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return _Terms(float(row.delta), float(row.epsilon_cap), loads_shares(row.shares).unfixed)


@dataclass(frozen=True)
class RunResult:
    """A run and its dataset after an operation."""

    run: Run
    dataset: DatasetView
    effect: ledger.Effect | None = None


@dataclass(frozen=True)
class Planned(RunResult):
    """A run planned: its hold written."""


@dataclass(frozen=True)
class Finished(RunResult):
    """A run completed or aborted: what was left of its hold released."""


@dataclass(frozen=True)
class EpochResult:
    """One charged epoch."""

    run: Run
    epoch: int
    beyond_plan: bool
    ledger_seq: int
    dataset: DatasetView
    effect: ledger.Effect | None = None


def refusal(
    budget: Budget, dataset: Dataset, cost: Cost, what: str, **extra: float
) -> BudgetExhausted:
    """A budget refusal with the numbers that explain it."""
    spent, reserved = budget.epsilon_spent(), budget.epsilon_reserved()
    after = budget.epsilon_with(cost)
    return BudgetExhausted(
        f"{what} does not fit: the dataset would reach ε={after:.6g} against a cap of "
        f"{dataset.epsilon_cap:g} (spent {spent:.6g}, reserved {reserved:.6g})",
        epsilon_cap=dataset.epsilon_cap,
        epsilon_spent=spent,
        epsilon_reserved=reserved,
        epsilon_requested=budget.own_epsilon(cost),
        epsilon_after=after,
        **extra,
    )


@dataclass(frozen=True)
class _FitLater:
    """What finding the σ that would fit a refused plan needs: the filter and the dataset's
    curve at the refusal, and the plan's shape (a search of milliseconds, never under a lock)."""

    filter: MemberFilter
    total: tuple[int, ...]
    sample_rate: float
    steps: int
    epochs: int
    sensitivity: float


class PlanRefused(BudgetExhausted):
    """A plan the filter refuses, with what finding the σ that would fit it needs."""

    def __init__(self, refused: BudgetExhausted, fit: _FitLater) -> None:
        super().__init__(refused.detail, **refused.extra)
        self.fit = fit

    def with_fitting_sigma(self) -> PlanRefused:
        """The refusal completed once the dataset's lock is released: when more noise would
        make the plan fit, it says so and names that σ."""
        fit = self.fit
        charged = calibrate.sigma_that_fits(
            fit.filter, fit.total, fit.sample_rate, fit.steps, fit.epochs
        )
        if charged is not None:
            sigma = charged * fit.sensitivity
            self.extra["noise_multiplier_that_fits"] = sigma
            self.detail += (
                f"; it would fit with noise_multiplier ≥ {sigma:.6g} (or plan with fit_remaining)"
            )
        return self


def plan_refusal(budget: Budget, dataset: Dataset, spec: RunSpec, cost: Cost) -> PlanRefused:
    """A plan's refusal; whether more noise would make it fit, and with which σ, is found after
    the lock is released (`PlanRefused.with_fitting_sigma`), from the state it was refused in."""
    refused = refusal(budget, dataset, cost, f"a plan of {spec.epochs} epochs")
    q, steps, sensitivity = spec.accounted_shape()
    filter_, total = budget.decided_against(cost)
    fit = _FitLater(filter_, tuple(total), q, steps, spec.epochs, sensitivity)
    return PlanRefused(refused, fit)


def rehearse_plan(
    pipeline: Pipeline, principal: Principal, dataset_id: str, spec: RunSpec
) -> Planned:
    """What `plan` would hold now, without holding it; raises its refusal."""
    return pipeline.rehearse(plan(pipeline, principal, dataset_id, spec, None))


def _fitting(refusal: DomainError) -> DomainError:
    """A refused plan's refusal, completed once the lock is released (its fitting σ)."""
    return refusal.with_fitting_sigma() if isinstance(refusal, PlanRefused) else refusal


def plan(
    pipeline: Pipeline,
    principal: Principal,
    dataset_id: str,
    spec: RunSpec,
    idempotency: Idempotency | None = None,
) -> Admission[Planned]:
    """Plan a run: calibrate, then hold the whole plan if the filter admits it.

    Reads the dataset's terms and calibrates before the lock (may touch the database).
    """
    principal.require("trainer")
    terms = _dataset_terms(pipeline.db, principal, dataset_id)
    delta = terms.delta
    early = None if spec.fit_remaining else calibrate_plan(spec, delta)
    if terms.unfixed:
        # The shares this plan would fix (memoised): milliseconds, up to ~1 s at extreme caps
        # for a fill, not spent under the lock when the cap is still the one read here.
        sigma = early.noise_multiplier if early is not None else 1.0
        shape = _plan_mechanism(spec, sigma, spec.epochs)
        first_admission_shares(terms.epsilon_cap, delta, shape, fill=spec.fit_remaining)
    # The PLD ε alone, before the lock (memoised per shape); fit_remaining's σ is only known
    # under the lock, so its figure stays pending (both columns NULL) for the next read.
    figure = (
        run_pld.of_plan(_plan_mechanism(spec, early.noise_multiplier, spec.epochs), delta)
        if early is not None
        else None
    )

    def decide(session: Session, dataset: Dataset | None) -> Planned:
        assert dataset is not None
        now, budget = holds.begin(session, dataset)
        calibration = early or fit_plan(spec, budget)
        run = Run(
            id=new_id("run"),
            dataset_id=dataset.id,
            name=spec.name,
            status="active",
            sampling=spec.sampling,
            sample_rate=spec.sample_rate,
            steps_per_epoch=spec.steps_per_epoch,
            epochs=spec.epochs,
            epochs_charged=0,
            noise_multiplier=calibration.noise_multiplier,
            max_grad_norm=spec.max_grad_norm,
            target_epsilon=spec.target_epsilon,
            epsilon=calibration.epsilon,
            epsilon_per_epoch=calibration.epsilon_per_epoch,
            epsilon_pld=figure.epsilon if figure else None,
            epsilon_pld_note=figure.note if figure else None,
            lease_seconds=spec.lease_seconds,
            expires_at=now + timedelta(seconds=spec.lease_seconds),
            created_by=principal.id,
            created_at=now,
            updated_at=now,
        )
        shape = _plan_shape(spec, budget, calibration.noise_multiplier)
        epoch = budget.cost_of(holds.epoch_mechanism(run), shape, fill=spec.fit_remaining)
        run.epoch_units = dumps_units(epoch.units)
        plan = epoch.times(spec.epochs)
        if not budget.admits(plan):
            raise plan_refusal(budget, dataset, spec, plan)
        session.add(run)
        holds.started(dataset, run)
        budget.hold(plan)
        request = ledger.Append(
            "hold",
            principal.actor,
            mechanism=holds.epoch_mechanism(run, spec.epochs),
            cost=plan,
            run_id=run.id,
            idempotency_key=idempotency.key if idempotency else None,
            details={
                "epochs": spec.epochs,
                "steps_per_epoch": spec.steps_per_epoch,
                "sampling": spec.sampling,
                "target_epsilon": spec.target_epsilon,
                **({"fit_remaining": True} if spec.fit_remaining else {}),
                "name": spec.name,
            },
        )
        entry = ledger.append(session, dataset, budget, request, now)
        pipeline.remember_run(run.id, dataset.id)  # its epochs then need no lookup
        return Planned(run, view(dataset, budget), entry.effect)

    return Admission(
        decide, dataset_id=dataset_id, idempotency=idempotency, operation="plan", refine=_fitting
    )


def _run_dataset(pipeline: Pipeline, principal: Principal, run_id: str) -> str:
    """The dataset of a run visible to the key (NotFound otherwise)."""
    dataset_id = pipeline.dataset_of_run(run_id)
    _require_visible(principal, dataset_id, run_id)
    return dataset_id


def _locked_run(session: Session, run_id: str) -> Run:
    # The session is the write transaction's own, begun after the lock: the identity map holds
    # only rows read under it (the pipeline loads a batch's runs in one statement), and an
    # earlier admission of the same batch may have changed one, so no populate_existing.
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    return run


def _require_visible(principal: Principal, dataset_id: str | None, run_id: str) -> None:
    """NotFound for a run that does not exist (no dataset) or whose dataset the key may not
    see: the two answers are the same, so a key learns nothing of other datasets' runs."""
    if dataset_id is None or not principal.sees(dataset_id):
        raise NotFound(f"run {run_id!r} not found")


def rehearse_epoch(pipeline: Pipeline, principal: Principal, run_id: str) -> EpochResult:
    """What `epoch` would charge now, without charging; raises its refusal."""
    return pipeline.rehearse(epoch(principal, run_id, None))


def epoch(
    principal: Principal, run_id: str, idempotency: Idempotency | None = None
) -> Admission[EpochResult]:
    """Charge the run's next epoch (from its hold, or beyond the plan if the filter admits it)."""
    principal.require("trainer")

    def decide(session: Session, dataset: Dataset | None) -> EpochResult:
        assert dataset is not None
        _require_visible(principal, dataset.id, run_id)
        # Expire first: this very run may have lapsed, and then it is not active.
        now, budget = holds.begin(session, dataset, charging=False)
        run = _locked_run(session, run_id)
        if run.status != "active":
            raise RunNotActive(f"run {run_id!r} is {run.status}", run_status=run.status)
        if dataset.frozen:
            raise DatasetFrozen(f"dataset {dataset.id!r} is frozen")
        cost = holds.epoch_cost(run)
        within_plan = run.epochs_charged < run.epochs
        if not within_plan and not budget.admits(cost):
            raise refusal(
                budget, dataset, cost, f"epoch {run.epochs_charged + 1} (beyond the plan)"
            )
        budget.charge(cost, from_hold=within_plan)
        holds.charge_epoch(session, dataset, run, now)
        request = ledger.Append(
            "charge",
            principal.actor,
            mechanism=holds.epoch_mechanism(run),
            cost=cost,
            run_id=run.id,
            idempotency_key=idempotency.key if idempotency else None,
            details={"epoch": run.epochs_charged, "from_hold": within_plan},
        )
        entry = ledger.append(session, dataset, budget, request, now)
        return EpochResult(
            run,
            run.epochs_charged,
            not within_plan,
            entry.seq,
            view(dataset, budget),
            entry.effect,
        )

    return Admission(decide, run_id=run_id, idempotency=idempotency, operation="epoch")


def finish(
    principal: Principal,
    run_id: str,
    status: str,
    idempotency: Idempotency | None = None,
) -> Admission[Finished]:
    """Complete or abort a run, releasing what is left of its hold."""
    # No PLD fill here: it would cost every completion a read before the lock for the few
    # fit_remaining runs whose figure is still pending (the next read of the run fills it).
    principal.require("trainer")

    def decide(session: Session, dataset: Dataset | None) -> Finished:
        assert dataset is not None
        _require_visible(principal, dataset.id, run_id)
        now, budget = holds.begin(session, dataset, charging=False)
        run = _locked_run(session, run_id)
        if run.status != "active":
            raise RunNotActive(f"run {run_id!r} is already {run.status}", run_status=run.status)
        entry = holds.release(
            session,
            dataset,
            budget,
            run,
            status=status,
            actor=principal.actor,
            now=now,
            idempotency_key=idempotency.key if idempotency else None,
        )
        return Finished(run, view(dataset, budget), entry.effect)

    return Admission(decide, run_id=run_id, idempotency=idempotency)


def get(pipeline: Pipeline, principal: Principal, run_id: str) -> Run:
    """One run (its dataset's lapsed holds expired first; its PLD ε computed if missing)."""
    principal.require("trainer", "auditor")
    dataset_id = _run_dataset(pipeline, principal, run_id)
    refresh(pipeline, dataset_id)
    db = pipeline.db
    with db.read() as session:
        run = _locked_run(session, run_id)
        delta = session.execute(select(Dataset.delta).where(Dataset.id == dataset_id)).scalar_one()
    run_pld.fill(pipeline, [run], float(delta))
    return run


def listing(
    pipeline: Pipeline,
    principal: Principal,
    dataset_id: str,
    *,
    status: str | None,
    after: str | None,
    limit: int,
) -> tuple[list[Run], bool]:
    """A dataset's runs in creation order after a cursor; and whether more follow."""
    principal.require("trainer", "auditor")
    principal.require_dataset(dataset_id)
    refresh(pipeline, dataset_id)
    db = pipeline.db
    with db.read() as session:
        statement = select(Run).where(Run.dataset_id == dataset_id).order_by(Run.id)
        if status:
            statement = statement.where(Run.status == status)
        if after:
            statement = statement.where(Run.id > after)
        rows = list(session.execute(statement.limit(limit + 1)).scalars())
        delta = session.execute(select(Dataset.delta).where(Dataset.id == dataset_id)).scalar()
    if delta is not None:
        run_pld.fill(pipeline, rows[:limit], float(delta))
    return rows[:limit], len(rows) > limit
