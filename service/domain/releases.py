"""Noisy releases: calibrate the noise, charge it, optionally add it ourselves.

Without `values` the caller adds the noise and the ledger charges the
continuous mechanism named. With `values` the service adds it, and the charge
is the mechanism it actually runs (`service.domain.noise`): the values rounded
to a power-of-two grid plus exact discrete Laplace (charged as pure ε-DP) or
discrete Gaussian noise (charged as a Gaussian of the rounded values'
sensitivity), drawn from the OS's CSPRNG. The noise is drawn before the
dataset is locked (a large release costs no lock time); a refused or replayed
request simply never shows it.

A request may carry K identical releases (`count`, or one value vector each in
`batch`): one admission and one ledger entry whose cost is exactly K times one
release's (docs/accounting.md §11); `charge` is the one place every release,
noisy argmax included, is admitted and written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session

from accountant import calibrate
from accountant.mechanisms import Gaussian, Laplace, Mechanism, PureDP
from service.domain import holds, ledger, noise
from service.domain.budget import Budget, Cost
from service.domain.datasets import DatasetView, view
from service.domain.errors import InvalidRequest
from service.domain.keys import Principal
from service.domain.pipeline import Admission, Idempotency, Pipeline
from service.domain.runs import new_id, refusal
from service.storage.database import stage
from service.storage.models import Dataset, Release


@dataclass(frozen=True)
class ReleaseSpec:
    """What a trainer asks to release."""

    mechanism: str
    sensitivity: float
    epsilon: float | None
    delta: float | None
    noise_scale: float | None
    values: list[float] | None
    name: str | None
    # A batch of K identical releases (one admission, one entry, K times the cost): `count`
    # where the caller adds the noise, or one value vector per release in `batch`.
    count: int = 1
    batch: list[list[float]] | None = None

    @property
    def releases(self) -> int:
        """K: how many releases the request charges."""
        return len(self.batch) if self.batch is not None else self.count

    @property
    def size(self) -> int | None:
        """How many values each release carries (None when the caller adds the noise)."""
        if self.batch is not None:
            return len(self.batch[0]) if self.batch else 0
        return len(self.values) if self.values is not None else None


@dataclass(frozen=True)
class Calibrated:
    """The charged mechanism, the absolute noise scale and the release's own (ε, δ).

    `noise` is how the service noises the values (None when the caller adds the noise).
    """

    mechanism: Mechanism
    noise_scale: float | None
    epsilon: float
    delta: float | None
    noise: noise.NoisePlan | None = None


@dataclass(frozen=True)
class ReleaseResult:
    """A charged release, its noised values (if the service added the noise) and the dataset."""

    release: Release
    noised_values: list[float] | None
    dataset: DatasetView
    noise: dict[str, Any] | None = None
    effect: ledger.Effect | None = None
    count: int = 1
    noised_batch: list[list[float]] | None = None
    labels: list[int] | None = None


def calibrate_release(spec: ReleaseSpec, dataset_delta: float) -> Calibrated:
    """Noise for one release of the request and the mechanism charged for one; InvalidRequest
    if inconsistent."""
    if spec.values is not None and spec.batch is not None:
        raise InvalidRequest("give values (one release) or batch (several), not both")
    if spec.count != 1 and (spec.values is not None or spec.batch is not None):
        raise InvalidRequest(
            "count is for releases whose noise you add; with values, send one vector per "
            "release in batch"
        )
    if spec.batch is not None and len({len(vector) for vector in spec.batch}) > 1:
        raise InvalidRequest("every vector of a batch must hold the same number of values")
    return _calibrated(
        spec.mechanism,
        spec.sensitivity,
        spec.epsilon,
        spec.delta,
        spec.noise_scale,
        spec.size,
        dataset_delta,
    )


def batched(mechanism: Mechanism, count: int) -> Mechanism:
    """`count` compositions of one release's mechanism: the same value with steps × count."""
    if count == 1:
        return mechanism
    return replace(mechanism, steps=mechanism.steps * count)


def batch_cost(budget: Budget, mechanism: Mechanism, count: int) -> Cost:
    """The cost of `count` releases of `mechanism`: exactly `count` times one release's cost.

    Composition adds RDP curves (Mironov 2017, Prop. 1), and each single curve is already
    rounded up to whole units, so a batch costs, to the unit, what its releases one by one do;
    its pure-ε part is `count` times one release's, exactly.
    """
    return budget.cost_of(mechanism).times(count)


def declared_epsilon(epsilon: float) -> Fraction:
    """A requested ε as the decimal number it was written as (0.1 is 1/10, not the float).

    The service's Laplace noise is calibrated exactly to this rational, so the
    mechanism that runs is exactly as private as asked, and ten releases of
    0.1 sum to exactly 1.
    """
    return Fraction(repr(epsilon))


@lru_cache(maxsize=4096)
def _calibrated(
    mechanism: str,
    sensitivity: float,
    epsilon: float | None,
    delta: float | None,
    noise_scale: float | None,
    size: int | None,
    dataset_delta: float,
) -> Calibrated:
    if (epsilon is None) == (noise_scale is None):
        raise InvalidRequest("give exactly one of epsilon and noise_scale")
    if size == 0:
        raise InvalidRequest("values, when given, must hold at least one number")
    try:
        if mechanism == "gaussian":
            if epsilon is not None and delta is None:
                raise InvalidRequest("a Gaussian release with epsilon needs delta")
            if size is not None:
                return _gaussian_on_grid(
                    sensitivity, size, epsilon, delta, noise_scale, dataset_delta
                )
            if epsilon is not None:
                assert delta is not None
                sigma = calibrate.gaussian_sigma(epsilon, delta, sensitivity)
                return Calibrated(Gaussian(sigma / sensitivity), sigma, epsilon, delta)
            assert noise_scale is not None
            used_delta = delta if delta is not None else dataset_delta
            epsilon = calibrate.gaussian_epsilon(noise_scale, used_delta, sensitivity)
            return Calibrated(Gaussian(noise_scale / sensitivity), noise_scale, epsilon, used_delta)
        if delta is not None:
            raise InvalidRequest(f"delta does not apply to a {mechanism} release (pure ε-DP)")
        if mechanism == "laplace":
            if size is not None:
                return _laplace_on_grid(sensitivity, size, epsilon, noise_scale)
            if epsilon is not None:
                # b ≥ Δ/ε for ε the decimal the request wrote, so the charge below is ≥ it.
                scale = noise.float_up(Fraction(sensitivity) / declared_epsilon(epsilon))
                calibrate.laplace_scale(epsilon, sensitivity)  # the accountant's argument checks
                return Calibrated(_laplace(scale, sensitivity), scale, epsilon, None)
            assert noise_scale is not None
            epsilon = noise.epsilon_up(Fraction(sensitivity) / Fraction(noise_scale))
            return Calibrated(_laplace(noise_scale, sensitivity), noise_scale, epsilon, None)
        # pure_dp: any ε-DP mechanism the caller runs itself (e.g. the exponential mechanism).
        if noise_scale is not None or size is not None:
            raise InvalidRequest("a pure_dp release takes epsilon only (no noise_scale, no values)")
        assert epsilon is not None
        return Calibrated(PureDP(epsilon), None, epsilon, None)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    except OverflowError:
        raise InvalidRequest("the request's noise scale or ε is out of range") from None


def _laplace(scale: float, sensitivity: float) -> Laplace:
    """Laplace noise b on L1 sensitivity Δ, as the ratio b/Δ rounded down (it charges 1/ratio)."""
    return Laplace(noise.float_down(Fraction(scale) / Fraction(sensitivity)))


@lru_cache(maxsize=4096)
def _noise_plan(
    mechanism: str,
    sensitivity: float,
    epsilon: float | None,
    delta: float | None,
    noise_scale: float | None,
    size: int,
) -> tuple[noise.NoisePlan, Fraction | None]:
    """The grid and exact noise for `size` values (and a Laplace plan's exact ε)."""
    if mechanism == "laplace":
        plan, exact = noise.laplace_plan(
            sensitivity,
            size,
            epsilon=declared_epsilon(epsilon) if epsilon is not None else None,
            scale=noise_scale,
        )
        return plan, exact
    plan = noise.gaussian_plan(sensitivity, size, sigma=noise_scale, epsilon=epsilon, delta=delta)
    return plan, None


def noise_plan(spec: ReleaseSpec) -> noise.NoisePlan:
    """How the service will noise a release's values (the request alone decides it)."""
    calibrate_release(spec, 0.5)  # every consistency check a real call makes
    assert spec.size is not None
    return _noise_plan(
        spec.mechanism,
        spec.sensitivity,
        spec.epsilon,
        spec.delta,
        spec.noise_scale,
        spec.size,
    )[0]


def _laplace_on_grid(
    sensitivity: float, size: int, epsilon: float | None, noise_scale: float | None
) -> Calibrated:
    """Discrete Laplace on the grid: exactly ε-DP for the rounded values, charged as pure ε-DP."""
    plan, exact = _noise_plan("laplace", sensitivity, epsilon, None, noise_scale, size)
    assert exact is not None
    # With epsilon given the mechanism is exactly the declared (decimal) ε; else rounded up.
    charged = epsilon if epsilon is not None else noise.epsilon_up(exact)
    return Calibrated(PureDP(charged), plan.noise_scale, charged, None, plan)


def _gaussian_on_grid(
    sensitivity: float,
    size: int,
    epsilon: float | None,
    delta: float | None,
    noise_scale: float | None,
    dataset_delta: float,
) -> Calibrated:
    """Discrete Gaussian on the grid, charged as a Gaussian of the rounded values' sensitivity."""
    plan, _ = _noise_plan("gaussian", sensitivity, epsilon, delta, noise_scale, size)
    # σ / Δ_rounded, with σ rounded down and the ratio too: charges never assume less noise.
    multiplier = noise.float_down(Fraction(plan.sigma_at_least) / Fraction(plan.sensitivity))
    sigma = plan.noise_scale
    if epsilon is None:
        delta = delta if delta is not None else dataset_delta
        epsilon = calibrate.gaussian_epsilon(plan.sigma_at_least, delta, plan.sensitivity)
    return Calibrated(Gaussian(multiplier), sigma, epsilon, delta, plan)


def noise_details(calibrated: Calibrated) -> dict[str, Any] | None:
    """How the service noised the values, as recorded in the ledger and answered."""
    plan = calibrated.noise
    if plan is None:
        return None
    return {
        "distribution": plan.distribution,
        "grid": plan.grid,
        "rounding": "to the nearest multiple of the grid, ties to even",
        "sensitivity_after_rounding": plan.sensitivity,
        "noise_scale": plan.noise_scale,
        "largest_value": plan.largest_input,
        # Exact, in grid steps: the discrete Laplace's scale t, or the discrete Gaussian's σ².
        "exact_parameter": f"{plan.parameter.numerator}/{plan.parameter.denominator}",
    }


def rehearse(
    pipeline: Pipeline, principal: Principal, dataset_id: str, spec: ReleaseSpec
) -> ReleaseResult:
    """What `release` would charge now, without charging (no noise drawn); raises its refusal."""
    return pipeline.rehearse(release(principal, dataset_id, spec, None, noised=False))


def release(
    principal: Principal,
    dataset_id: str,
    spec: ReleaseSpec,
    idempotency: Idempotency | None = None,
    *,
    noised: bool = True,
) -> Admission[ReleaseResult]:
    """Charge one release, or a batch of K, if the filter admits it; with values given, they
    are noised here, before the lock (CPU work proportional to them)."""
    principal.require("trainer")
    principal.require_dataset(dataset_id)
    noised_values: list[float] | None = None
    noised_batch: list[list[float]] | None = None
    if noised and (spec.values is not None or spec.batch is not None):
        # The grid and the noise depend on the request alone (never on the dataset's δ), so the
        # values are noised before the dataset is locked; a refusal discards them unseen.
        plan = noise_plan(spec)
        if spec.values is not None:
            noised_values = plan.noised(spec.values)
        else:
            assert spec.batch is not None
            noised_batch = [plan.noised(vector) for vector in spec.batch]

    def decide(session: Session, dataset: Dataset | None) -> ReleaseResult:
        assert dataset is not None
        calibrated = calibrate_release(spec, dataset.delta)
        release, dataset_view, effect = charge(
            session,
            dataset,
            principal,
            mechanism=calibrated.mechanism,
            count=spec.releases,
            what=f"a {spec.mechanism} release"
            if spec.releases == 1
            else (f"a batch of {spec.releases} {spec.mechanism} releases"),
            row={
                "mechanism": spec.mechanism,
                "sensitivity": spec.sensitivity,
                "noise_scale": calibrated.noise_scale,
                "epsilon": calibrated.epsilon,
                "delta": calibrated.delta,
                "name": spec.name,
            },
            idempotency=idempotency,
            details={
                "release": spec.mechanism,
                "sensitivity": spec.sensitivity,
                "noise_scale": calibrated.noise_scale,
                "epsilon": calibrated.epsilon,
                "delta": calibrated.delta,
                "values": spec.size,
                "count": spec.releases,
                "noise": noise_details(calibrated),
                "name": spec.name,
            },
        )
        return ReleaseResult(
            release,
            noised_values,
            dataset_view,
            noise_details(calibrated),
            effect,
            count=spec.releases,
            noised_batch=noised_batch,
        )

    return Admission(decide, dataset_id=dataset_id, idempotency=idempotency, operation="release")


def charge(
    session: Session,
    dataset: Dataset,
    principal: Principal,
    *,
    mechanism: Mechanism,
    count: int,
    what: str,
    row: dict[str, Any],
    idempotency: Idempotency | None,
    details: dict[str, Any],
) -> tuple[Release, DatasetView, ledger.Effect]:
    """On a locked dataset: admit `count` releases of `mechanism` or refuse them all, then
    store the release row (`row`: its columns beyond ids and times) and its one charge entry.

    Shared by every kind of release (service.domain.inference too), so a batch and a single
    release are decided, charged and recorded by the same lines.
    """
    now, budget = holds.begin(session, dataset)
    cost = batch_cost(budget, mechanism, count)
    if not budget.admits(cost):
        raise refusal(budget, dataset, cost, what)
    budget.charge(cost, from_hold=False)
    release = Release(
        id=new_id("rel"),
        dataset_id=dataset.id,
        ledger_seq=dataset.last_seq + 1,
        created_by=principal.id,
        created_at=now,
        **row,
    )
    stage(session, release)
    request = ledger.Append(
        "charge",
        principal.actor,
        mechanism=batched(mechanism, count),
        cost=cost,
        release_id=release.id,
        idempotency_key=idempotency.key if idempotency else None,
        details=details,
    )
    entry = ledger.append(session, dataset, budget, request, now)
    return release, view(dataset, budget), entry.effect
