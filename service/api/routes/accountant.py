"""Stateless planning calculators (any role)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import CurrentKey
from service.api.schemas import (
    EpsilonPublic,
    EpsilonRequest,
    NoiseMultiplierPublic,
    NoiseMultiplierRequest,
    problems,
)
from service.domain import calculators

router = APIRouter(prefix="/v1/accountant", tags=["accountant"])


@router.post(
    "/epsilon",
    response_model=EpsilonPublic,
    operation_id="plan_epsilon",
    responses=problems(401, body=True),
)
def plan_epsilon(body: EpsilonRequest, _: CurrentKey) -> EpsilonPublic:
    """ε at δ of a DP-SGD plan on its own (Poisson-subsampled Gaussian, RDP)."""
    epsilon = calculators.plan_epsilon(
        body.sample_rate, body.noise_multiplier, body.steps, body.delta
    )
    return EpsilonPublic(epsilon=epsilon)


@router.post(
    "/noise-multiplier",
    response_model=NoiseMultiplierPublic,
    operation_id="plan_noise_multiplier",
    responses=problems(401, body=True),
)
def plan_noise_multiplier(body: NoiseMultiplierRequest, _: CurrentKey) -> NoiseMultiplierPublic:
    """The smallest σ for which the plan alone is (target_epsilon, δ)-DP."""
    sigma, epsilon = calculators.plan_noise_multiplier(
        body.sample_rate, body.steps, body.target_epsilon, body.delta
    )
    return NoiseMultiplierPublic(noise_multiplier=sigma, epsilon=epsilon)
