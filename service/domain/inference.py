"""Private prediction: noisy argmax over teachers' vote histograms (GNMax; Papernot et al. 2018).

The caller sends K histograms of votes from N teachers, each trained on its own
disjoint part of the dataset. The service adds exact discrete Gaussian noise of
std σ to every count (`service.domain.samplers`, by exact inversion for σ up to
about 1,390, from the OS's CSPRNG) and
answers only the winning label of each histogram; the counts and the noise
never leave this module. Counts are integers, so no grid is needed: the noise
plan is the discrete Gaussian on the integers with σ² rounded up to a
power-of-two denominator (`noise.rounded_variance`).

The charge (docs/accounting.md §10): one record changes one teacher's vote, so
a histogram moves by an integer vector of L2 norm ≤ √2; the discrete
Gaussian's RDP is then α·2/(2σ²) (Canonne, Kamath & Steinke 2020), the label
is post-processing, and K histograms compose to K times that curve, charged
as `Gaussian(σ/√2 rounded down, steps=K)`. Ties go to the smallest label (a
fixed rule applied to the noisy counts: post-processing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
from sqlalchemy.orm import Session

from accountant import calibrate
from accountant.mechanisms import Gaussian
from service.domain import noise, releases, samplers
from service.domain.errors import InvalidRequest
from service.domain.keys import Principal
from service.domain.pipeline import Admission, Idempotency, Pipeline
from service.domain.releases import Calibrated, ReleaseResult
from service.storage.models import Dataset

__all__ = [
    "MAX_CLASSES",
    "MAX_COUNTS",
    "MAX_HISTOGRAMS",
    "MAX_TEACHERS",
    "MIN_NOISE_SCALE",
    "SENSITIVITY",
    "ArgmaxSpec",
    "calibrate_argmax",
    "check_votes",
    "noisy_argmax",
    "queries",
]

MAX_HISTOGRAMS = 10_000
MAX_CLASSES = 1_000
MAX_COUNTS = 100_000
MAX_TEACHERS = 1_000_000
# Below this σ the discrete Gaussian on the integers is 0 with probability > 1 − 10^-21: the
# label is the exact argmax, and the σ² rounding would need ever larger integers.
MIN_NOISE_SCALE = 0.1


def _sqrt2_up() -> float:
    """The smallest float ≥ √2: the L2 sensitivity, rounded so charges never assume less."""
    root = math.sqrt(2.0)
    while Fraction(root) ** 2 < 2:
        root = math.nextafter(root, math.inf)
    return root


# One record moves one teacher's vote from one class to another: (…, −1, …, +1, …).
SENSITIVITY = _sqrt2_up()
TIE_BREAK = "the smallest label among the largest noisy counts"


@dataclass(frozen=True)
class ArgmaxSpec:
    """What a caller asks: K vote histograms of N teachers, and the noise per query."""

    teachers: int
    votes: list[list[int]]
    epsilon: float | None
    delta: float | None
    noise_scale: float | None
    name: str | None


def check_votes(teachers: int, votes: list[list[int]]) -> np.ndarray:
    """The votes as a (K, C) int64 array; InvalidRequest unless they are K ≤ 10,000 histograms
    of 2 to 1,000 classes (≤ 100,000 counts in all), of integer counts ≥ 0 summing to at most
    `teachers` ≤ 10^6 each.

    The sum bound is what the sensitivity rests on: each teacher votes at most once.
    """
    if not 1 <= teachers <= MAX_TEACHERS:
        raise InvalidRequest(f"teachers must be between 1 and {MAX_TEACHERS:,}")
    if not 1 <= len(votes) <= MAX_HISTOGRAMS:
        raise InvalidRequest(f"votes must hold 1 to {MAX_HISTOGRAMS:,} histograms")
    classes = len(votes[0])
    if any(len(histogram) != classes for histogram in votes):
        raise InvalidRequest("every histogram of votes must have the same number of classes")
    if not 2 <= classes <= MAX_CLASSES:
        raise InvalidRequest(f"a histogram must have 2 to {MAX_CLASSES:,} classes")
    if len(votes) * classes > MAX_COUNTS:
        raise InvalidRequest(f"votes may hold at most {MAX_COUNTS:,} counts in all")
    # Integers only: a float or a number past int64 gives another dtype (JSON booleans are
    # refused by the HTTP schema, which reads counts strictly).
    counts = np.asarray(votes)
    if counts.dtype.kind != "i" or counts.dtype.itemsize > 8:
        raise InvalidRequest("votes must be integer counts")
    negative = np.flatnonzero((counts < 0).any(axis=1))
    if negative.size:
        raise InvalidRequest(f"votes[{int(negative[0])}]: counts must be ≥ 0")
    counts = counts.astype(np.int64, copy=False)
    totals = counts.sum(axis=1)
    over = np.flatnonzero(totals > teachers)
    if over.size:
        row = int(over[0])
        raise InvalidRequest(
            f"votes[{row}] sums to {int(totals[row])} votes, more than the {teachers} teachers "
            "(each teacher votes at most once per query)"
        )
    return counts


@lru_cache(maxsize=1024)
def calibrate_argmax(
    epsilon: float | None,
    delta: float | None,
    noise_scale: float | None,
    dataset_delta: float,
    classes: int,
) -> Calibrated:
    """The noise on each count and the mechanism charged for one query (a Gaussian of
    sensitivity √2); InvalidRequest if the request is inconsistent.

    With `epsilon` and `delta`, σ is the analytic Gaussian's (Balle & Wang 2018) at
    sensitivity √2; with `noise_scale`, σ is given and the query's own ε is the analytic
    Gaussian ε at `delta` (the dataset's δ when not given). Either way σ² is then rounded up
    (by ≤ 2^-20 relative) and the charge assumes the rounded-down root of the rounded σ²,
    over √2 rounded up: never more noise than runs.
    """
    if (epsilon is None) == (noise_scale is None):
        raise InvalidRequest("give exactly one of epsilon and noise_scale")
    if epsilon is not None and delta is None:
        raise InvalidRequest("a noisy_argmax query with epsilon needs delta")
    try:
        if epsilon is not None:
            assert delta is not None
            sigma = calibrate.gaussian_sigma(epsilon, delta, SENSITIVITY)
        else:
            assert noise_scale is not None
            sigma = noise_scale
        if not MIN_NOISE_SCALE <= sigma <= 1e6:
            raise InvalidRequest(
                f"the noise on each count must have σ from {MIN_NOISE_SCALE} to 1e6"
            )
        # Grid 2^0: the counts are integers already, so rounding them changes nothing.
        plan = noise.NoisePlan(
            "discrete_gaussian", 0, noise.rounded_variance(Fraction(sigma)), SENSITIVITY, classes
        )
        multiplier = noise.float_down(Fraction(plan.sigma_at_least) / Fraction(SENSITIVITY))
        if epsilon is None:
            delta = delta if delta is not None else dataset_delta
            epsilon = calibrate.gaussian_epsilon(plan.sigma_at_least, delta, SENSITIVITY)
        mechanism = Gaussian(multiplier)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if not math.isfinite(epsilon):
        raise InvalidRequest("this noise_scale is too small for a finite ε per query")
    return Calibrated(mechanism, plan.noise_scale, epsilon, delta, plan)


def noisy_argmax(counts: np.ndarray, plan: noise.NoisePlan) -> list[int]:
    """The label of each histogram after exact discrete Gaussian noise on every count.

    A fresh CSPRNG per request; ties go to the smallest label (numpy's argmax picks the
    first maximum), a rule applied to the noisy counts only.
    """
    histograms, classes = counts.shape
    draws = plan.draw(samplers.Csprng(), histograms * classes)
    # |count| ≤ 10^6 and the draws are far inside int64: the sums are exact.
    noisy = counts + np.asarray(draws, dtype=np.int64).reshape(histograms, classes)
    return [int(label) for label in np.argmax(noisy, axis=1)]


def rehearse(
    pipeline: Pipeline, principal: Principal, dataset_id: str, spec: ArgmaxSpec
) -> ReleaseResult:
    """What `queries` would charge now (no noise drawn, no labels); raises its refusal."""
    return pipeline.rehearse(queries(principal, dataset_id, spec, None, answered=False))


def queries(
    principal: Principal,
    dataset_id: str,
    spec: ArgmaxSpec,
    idempotency: Idempotency | None = None,
    *,
    answered: bool = True,
) -> Admission[ReleaseResult]:
    """Charge K noisy-argmax queries as one batch (all or nothing) and answer their labels;
    the votes are checked here, before the lock (CPU work proportional to them)."""
    principal.require("trainer")
    principal.require_dataset(dataset_id)
    counts = check_votes(spec.teachers, spec.votes)
    histograms, classes = counts.shape
    # Every consistency check before the lock; the dataset's δ only matters with noise_scale.
    calibrate_argmax(spec.epsilon, spec.delta, spec.noise_scale, 0.5, classes)
    labels: list[int] | None = None
    if answered:
        # The noise plan depends on the request alone, so the labels are drawn before the
        # dataset is locked; a refusal discards them unseen, and the counts go no further.
        plan = calibrate_argmax(spec.epsilon, spec.delta, spec.noise_scale, 0.5, classes).noise
        assert plan is not None
        labels = noisy_argmax(counts, plan)
    del counts

    def decide(session: Session, dataset: Dataset | None) -> ReleaseResult:
        assert dataset is not None
        calibrated = calibrate_argmax(
            spec.epsilon, spec.delta, spec.noise_scale, dataset.delta, classes
        )
        details = releases.noise_details(calibrated)
        release, dataset_view, effect = releases.charge(
            session,
            dataset,
            principal,
            mechanism=calibrated.mechanism,
            count=histograms,
            what=f"a batch of {histograms} noisy_argmax queries",
            row={
                "mechanism": "noisy_argmax",
                "sensitivity": SENSITIVITY,
                "noise_scale": calibrated.noise_scale,
                "epsilon": calibrated.epsilon,
                "delta": calibrated.delta,
                "name": spec.name,
            },
            idempotency=idempotency,
            # What the query was, never what it saw: no counts, no noise, not even the labels.
            details={
                "release": "noisy_argmax",
                "sensitivity": SENSITIVITY,
                "noise_scale": calibrated.noise_scale,
                "epsilon": calibrated.epsilon,
                "delta": calibrated.delta,
                "count": histograms,
                "classes": classes,
                "teachers": spec.teachers,
                "tie_break": TIE_BREAK,
                "noise": details,
                "name": spec.name,
            },
        )
        return ReleaseResult(
            release, None, dataset_view, details, effect, count=histograms, labels=labels
        )

    return Admission(decide, dataset_id=dataset_id, idempotency=idempotency, operation="release")
