"""Each run's PLD ε: this run alone, not adaptive, shown beside its RDP ε, never used for the cap.

`accountant.pld` gives the tightest ε of one plan fixed in advance (docs/accounting.md §9), the
figure Opacus' PRV accountant shows. It is not a valid filter under adaptive composition
(DESIGN §3), so the service only shows it. A new plan shape costs 0.1–0.3 s (a shape seen
before ~40 µs, memoised), and that must never be paid while a dataset is locked:
- a plan whose σ is known before the lock (`target_epsilon`, `noise_multiplier`) gets its
  figure computed before the transaction, and stored with the run;
- a `fit_remaining` plan gets σ under the lock, so its answer says the figure is pending; the
  next read of the run (get, list, complete/abort) computes it outside any transaction and
  stores it in a short write of its own, which only ever fills a figure that is still empty.
Stored, not derived on every read: a figure once shown never changes (even if the PLD's
discretisation does), and after a restart a listing does not pay the cold cost again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import Session

from accountant import pld
from accountant.mechanisms import Gaussian, Mechanism, SubsampledGaussian
from service.domain import holds
from service.domain.memo import memoised
from service.domain.pipeline import Admission, Pipeline
from service.storage.models import Run

PENDING_NOTE = (
    "not computed yet: the PLD ε is never computed under the dataset's lock (a fit_remaining "
    "plan's σ is chosen there); the next read of this run shows it"
)
REFUSED_PREFIX = "the PLD accountant cannot compute this plan accurately: "
# A listing computes missing figures until this much time has gone, then leaves the rest
# pending for the next read: a page of old runs of many shapes never takes tens of seconds.
FILL_BUDGET_S = 1.0


@dataclass(frozen=True)
class PldFigure:
    """A run's PLD ε at its dataset's δ, or None and why not (`note`)."""

    epsilon: float | None
    note: str | None


PENDING = PldFigure(None, PENDING_NOTE)


@memoised(maxsize=4096)
def of_plan(plan: Mechanism, delta: float) -> PldFigure:
    """The PLD figure of a whole plan, charged as `plan`; memoised per plan shape (q, σ, steps,
    δ), refusals too (they are as deterministic as the figures)."""
    # Shuffled batches are charged as unamplified Gaussian steps (q = 1, σ/2 per epoch; docs/
    # accounting.md §1): the PLD uses exactly the shape the run is charged as.
    if isinstance(plan, SubsampledGaussian):
        shape = (plan.sample_rate, plan.noise_multiplier, plan.steps)
    elif isinstance(plan, Gaussian):
        shape = (1.0, plan.noise_multiplier, plan.steps)
    else:
        raise TypeError(f"a run is never charged as {type(plan).__name__}")
    try:
        return PldFigure(pld.dp_sgd_epsilon(*shape, delta), None)
    except ValueError as exc:
        return PldFigure(None, REFUSED_PREFIX + str(exc))


def of_run(run: Run, delta: float) -> PldFigure:
    """The PLD figure of a run's whole plan, as its hold is charged."""
    return of_plan(holds.epoch_mechanism(run, run.epochs), delta)


def stored(run: Run) -> PldFigure:
    """What a run shows now: its stored figure, its refusal, or pending."""
    if run.epsilon_pld is not None or run.epsilon_pld_note is not None:
        return PldFigure(run.epsilon_pld, run.epsilon_pld_note)
    return PENDING


def fill(pipeline: Pipeline, runs: Iterable[Run], delta: float) -> None:
    """Compute and store the figures still missing on `runs` (of one dataset, at its δ).

    Called outside any transaction: the computation runs first, then one short write stores
    what was computed, only where nothing is stored yet (a concurrent reader may have won;
    its figure is the same). Runs left once FILL_BUDGET_S has gone stay pending.
    """
    deadline = time.monotonic() + FILL_BUDGET_S
    computed: list[tuple[Run, PldFigure]] = []
    for run in runs:
        if stored(run) is not PENDING:
            continue
        if computed and time.monotonic() > deadline:
            break
        computed.append((run, of_run(run, delta)))
    if not computed:
        return

    def store(session: Session, _: object) -> None:
        for run, figure in computed:
            session.execute(
                update(Run)
                .where(Run.id == run.id, Run.epsilon_pld.is_(None), Run.epsilon_pld_note.is_(None))
                .values(epsilon_pld=figure.epsilon, epsilon_pld_note=figure.note)
                .execution_options(synchronize_session=False)
            )

    pipeline.submit(Admission(store))
    for run, figure in computed:
        # Detached rows: what this read answers (the database now holds the same figure).
        run.epsilon_pld, run.epsilon_pld_note = figure.epsilon, figure.note
