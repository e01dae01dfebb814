"""The stateless planning calculators (no dataset, nothing written)."""

from __future__ import annotations

import math

from accountant import calibrate
from service.domain.errors import InvalidRequest


def plan_epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """ε at δ of a DP-SGD plan on its own (RDP on the calibration grid)."""
    try:
        epsilon = calibrate.dp_sgd_epsilon(noise_multiplier, delta, sample_rate, steps)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    # As for a run's plan: an unbounded ε is refused, never answered (as null in JSON).
    if not math.isfinite(epsilon):
        raise InvalidRequest("noise_multiplier is too small: this plan's ε is unbounded")
    return epsilon


def plan_noise_multiplier(
    sample_rate: float, steps: int, target_epsilon: float, delta: float
) -> tuple[float, float]:
    """The smallest σ meeting target_epsilon, and that σ's ε."""
    try:
        sigma = calibrate.noise_multiplier(target_epsilon, delta, sample_rate, steps)
        return sigma, calibrate.dp_sgd_epsilon(sigma, delta, sample_rate, steps)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
