"""Noisy releases: calibrate the noise, charge it, optionally add it ourselves.

Noise the service adds comes from numpy's PCG64 seeded with 128 bits from the
OS's CSPRNG (`secrets`). Floating-point noise has known side channels
(Mironov 2012); callers who need a hardened sampler should add noise
themselves with `noise_scale` and treat the ledger as the accountant.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from sqlalchemy.orm import Session

from accountant import calibrate
from accountant.mechanisms import Gaussian, Laplace, Mechanism, PureDP
from service.domain import holds, ledger
from service.domain.datasets import DatasetView, view
from service.domain.errors import DomainError, InvalidRequest
from service.domain.keys import Principal
from service.domain.runs import new_id, refusal
from service.domain.transactions import Body, Idempotency, Outcome, rehearse, write
from service.storage.database import Database
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


@dataclass(frozen=True)
class Calibrated:
    """The charged mechanism, the absolute noise scale and the release's own (ε, δ)."""

    mechanism: Mechanism
    noise_scale: float | None
    epsilon: float
    delta: float | None


@dataclass(frozen=True)
class ReleaseResult:
    """A charged release, its noised values (if the service added the noise) and the dataset."""

    release: Release
    noised_values: list[float] | None
    dataset: DatasetView


def calibrate_release(spec: ReleaseSpec, dataset_delta: float) -> Calibrated:
    """Noise for the release and the mechanism charged for it; InvalidRequest if inconsistent."""
    return _calibrated(
        spec.mechanism,
        spec.sensitivity,
        spec.epsilon,
        spec.delta,
        spec.noise_scale,
        spec.values is not None,
        dataset_delta,
    )


@lru_cache(maxsize=4096)
def _calibrated(
    mechanism: str,
    sensitivity: float,
    epsilon: float | None,
    delta: float | None,
    noise_scale: float | None,
    has_values: bool,
    dataset_delta: float,
) -> Calibrated:
    if (epsilon is None) == (noise_scale is None):
        raise InvalidRequest("give exactly one of epsilon and noise_scale")
    try:
        if mechanism == "gaussian":
            if epsilon is not None:
                if delta is None:
                    raise InvalidRequest("a Gaussian release with epsilon needs delta")
                sigma = calibrate.gaussian_sigma(epsilon, delta, sensitivity)
                return Calibrated(Gaussian(sigma / sensitivity), sigma, epsilon, delta)
            assert noise_scale is not None
            used_delta = delta if delta is not None else dataset_delta
            epsilon = calibrate.gaussian_epsilon(noise_scale, used_delta, sensitivity)
            return Calibrated(Gaussian(noise_scale / sensitivity), noise_scale, epsilon, used_delta)
        if delta is not None:
            raise InvalidRequest(f"delta does not apply to a {mechanism} release (pure ε-DP)")
        if mechanism == "laplace":
            if epsilon is not None:
                scale = calibrate.laplace_scale(epsilon, sensitivity)
                return Calibrated(Laplace(scale / sensitivity), scale, epsilon, None)
            assert noise_scale is not None
            epsilon = sensitivity / noise_scale
            return Calibrated(Laplace(noise_scale / sensitivity), noise_scale, epsilon, None)
        # pure_dp: any ε-DP mechanism the caller runs itself (e.g. the exponential mechanism).
        if noise_scale is not None or has_values:
            raise InvalidRequest("a pure_dp release takes epsilon only (no noise_scale, no values)")
        assert epsilon is not None
        return Calibrated(PureDP(epsilon), None, epsilon, None)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def add_noise(values: list[float], calibrated: Calibrated) -> list[float]:
    """The values plus fresh noise of the calibrated scale, from a CSPRNG-seeded generator."""
    generator = np.random.default_rng(secrets.randbits(128))
    data = np.asarray(values, dtype=np.float64)
    scale = calibrated.noise_scale
    assert scale is not None
    if isinstance(calibrated.mechanism, Gaussian):
        noised = data + generator.normal(0.0, scale, size=data.shape)
    else:
        noised = data + generator.laplace(0.0, scale, size=data.shape)
    if not np.all(np.isfinite(noised)):
        raise InvalidRequest("values are too large: the noised values overflow")
    return [float(v) for v in noised]


def create(
    db: Database,
    principal: Principal,
    dataset_id: str,
    spec: ReleaseSpec,
    render: Callable[[ReleaseResult], Body],
    *,
    idempotency: Idempotency | None = None,
    dry_run: bool = False,
) -> Outcome | tuple[Body | None, DomainError | None]:
    """Charge one release if the filter admits it; add the noise when values are given."""
    principal.require("trainer")
    principal.require_dataset(dataset_id)

    def operation(session: Session, dataset: Dataset | None) -> tuple[int, Body]:
        assert dataset is not None
        calibrated = calibrate_release(spec, dataset.delta)
        now, budget = holds.begin(session, dataset)
        units = budget.units_of(calibrated.mechanism)
        if not budget.admits(units):
            raise refusal(budget, dataset, units, f"a {spec.mechanism} release")
        budget.charge(units, from_hold=False)
        release = Release(
            id=new_id("rel"),
            dataset_id=dataset.id,
            mechanism=spec.mechanism,
            sensitivity=spec.sensitivity,
            noise_scale=calibrated.noise_scale,
            epsilon=calibrated.epsilon,
            delta=calibrated.delta,
            name=spec.name,
            ledger_seq=dataset.last_seq + 1,
            created_by=principal.id,
            created_at=now,
        )
        session.add(release)
        request = ledger.Append(
            "charge",
            principal.id,
            mechanism=calibrated.mechanism,
            units=units,
            release_id=release.id,
            idempotency_key=idempotency.key if idempotency else None,
            details={
                "release": spec.mechanism,
                "sensitivity": spec.sensitivity,
                "noise_scale": calibrated.noise_scale,
                "epsilon": calibrated.epsilon,
                "delta": calibrated.delta,
                "values": len(spec.values) if spec.values is not None else None,
                "name": spec.name,
            },
        )
        ledger.append(session, dataset, budget, request, now)
        noised = (
            add_noise(spec.values, calibrated) if spec.values is not None and not dry_run else None
        )
        return 201, render(ReleaseResult(release, noised, view(dataset, budget)))

    if dry_run:
        return rehearse(db, operation, dataset_id=dataset_id)
    return write(db, operation, dataset_id=dataset_id, idempotency=idempotency, admission="release")
