"""Noise the service adds: exact discrete samplers on a power-of-two grid, fed by the OS's CSPRNG.

A float sample added to a float input is not differentially private: the low
bits of the sum give the input away (Mironov 2012; Jin et al. 2022 for the
Gaussian). So nothing here touches a float until the answer is formed:

1. Every value is rounded to the nearest multiple of a grid g = 2^k (ties to
   even), exactly: x / g is an exact float (a power-of-two shift) and its
   rounding an exact integer. The grid is 2^GRID_MARGIN_BITS times finer than
   both the noise scale and the declared sensitivity's share per value, so
   rounding costs a fraction ≤ 2^-12 of either.
2. Integer noise is drawn exactly — discrete Laplace or discrete Gaussian
   (Canonne, Kamath & Steinke 2020, Algorithms 1–3; for a discrete Gaussian of
   σ up to about 1,390 grid steps, by inversion of a uniform's lazily drawn
   bits against rigorous bounds of its CDF) — with integer and rational
   arithmetic only, from `os.urandom`.
3. The answer is the exact grid point g · (n + Z), converted to the nearest
   float. That conversion is post-processing of an exactly private integer;
   it is exact whenever |y| < 2^53 · g, and inputs are refused above
   2^52 · g so the noise keeps its resolution.

Rounding is part of the mechanism, so the sensitivity charged is that of the
rounded values: neighbouring inputs round to integers whose difference is at
most |v − v'| / g + 3/2 in every coordinate that differs (1 for the grid
rounding, ½ for the decimal-to-double parse of the request). Hence, for d
values, the L1 sensitivity on the grid is ⌊Δ₁/g + 3d/2⌋ (an integer) and the
L2 sensitivity is at most Δ₂/g + 1.5·√d. docs/accounting.md ("Noise the service
adds") has the proof and the charges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np

from accountant import calibrate
from service.domain import samplers
from service.domain.errors import InvalidRequest

__all__ = [
    "GRID_MARGIN_BITS",
    "NoisePlan",
    "epsilon_up",
    "float_down",
    "float_up",
    "gaussian_plan",
    "laplace_plan",
    "to_grid",
]

# The grid is this many binary orders finer than the noise scale and the per-value sensitivity.
GRID_MARGIN_BITS = 12
# Noise scales past this are refused: their tails could leave the float range, and no answer needs
# them. Grids below 2^-1000 are refused too: the answers would fall among subnormal floats.
_MAX_NOISE_SCALE = 1e200
_MIN_GRID_EXPONENT = -1000
# A discrete Gaussian's σ² is rounded up to a fraction with a power-of-two denominator, by at
# most this relative amount, so the vectorised sampler's integers stay in 62 bits.
_VARIANCE_ROUNDING = Fraction(1, 1 << 20)

Distribution = Literal["discrete_laplace", "discrete_gaussian"]


def _grid_exponent(scale: float, per_value_sensitivity: float) -> int:
    """k with 2^k ≤ 2^-GRID_MARGIN_BITS · min(scale, per-value sensitivity) < 2^(k+1)."""
    if not scale <= _MAX_NOISE_SCALE:
        raise InvalidRequest(
            f"the noise scale {scale:.6g} is beyond what the service's samplers take "
            f"(at most {_MAX_NOISE_SCALE:g})"
        )
    _, exponent = math.frexp(min(scale, per_value_sensitivity))  # x = m·2^e, m in [1/2, 1)
    grid = exponent - 1 - GRID_MARGIN_BITS
    if grid < _MIN_GRID_EXPONENT:
        raise InvalidRequest(
            "the sensitivity or noise scale is too small for the service's noise grid "
            f"(it would need a grid below 2^{_MIN_GRID_EXPONENT})"
        )
    return grid


@dataclass(frozen=True)
class NoisePlan:
    """How one release's values are noised: the distribution, the grid and its exact parameter.

    `parameter` is exact and in grid units: the discrete Laplace's scale b/g,
    or the discrete Gaussian's variance σ²/g². `sensitivity` is the
    sensitivity of the *rounded* values in value units (L1 for Laplace, L2 for
    Gaussian), the one the charge uses: at least the declared one.
    """

    distribution: Distribution
    grid_exponent: int
    parameter: Fraction
    sensitivity: float
    size: int

    @property
    def grid(self) -> float:
        """The grid step g = 2^grid_exponent."""
        return math.ldexp(1.0, self.grid_exponent)

    @property
    def noise_scale(self) -> float:
        """The noise's scale in value units (Laplace b, Gaussian σ), rounded up."""
        if self.distribution == "discrete_laplace":
            return math.ldexp(float_up(self.parameter), self.grid_exponent)
        return math.ldexp(_sqrt_up(self.parameter), self.grid_exponent)

    @property
    def sigma_at_least(self) -> float:
        """A Gaussian plan's σ in value units, rounded down (what a charge may assume)."""
        return math.ldexp(_sqrt_down(self.parameter), self.grid_exponent)

    @property
    def largest_input(self) -> float:
        """The largest |x| the grid carries exactly: 2^52 · g."""
        return math.ldexp(1.0, 52 + self.grid_exponent)

    def noised(self, values: Sequence[float]) -> list[float]:
        """Round `values` to the grid and add exact integer noise; 422 if a value is too large."""
        if len(values) != self.size:
            raise ValueError(f"this plan is for {self.size} values, got {len(values)}")
        limit = self.largest_input
        for index, x in enumerate(values):
            if not math.isfinite(x) or abs(x) > limit:
                raise InvalidRequest(
                    f"values[{index}] is beyond what the noise grid carries exactly at "
                    f"this noise scale (|value| ≤ {limit:.6g}: 2^52 grid steps of {self.grid:.6g})"
                )
        shift = self.grid_exponent
        rounded = [to_grid(x, shift) for x in values]
        noise = self.draw(samplers.Csprng(), len(values))
        # |n| ≤ 2^52 and the noise far below 2^52 steps: the sums are exact in float64 as well.
        totals = np.asarray([n + z for n, z in zip(rounded, noise, strict=True)], dtype=np.float64)
        return [float(y) for y in np.ldexp(totals, shift)]

    def draw(self, rng: samplers.Csprng, count: int) -> list[int]:
        """`count` exact integer noise draws of this plan (vectorised where the parameter fits)."""
        if self.distribution == "discrete_laplace":
            if samplers.fits_laplace(self.parameter):
                return samplers.laplace_array(rng, count, self.parameter)
            return [samplers.discrete_laplace(rng, self.parameter) for _ in range(count)]
        if samplers.fits_table(self.parameter):
            return samplers.gaussian_table(self.parameter).draw(rng, count)
        if samplers.fits_gaussian(self.parameter):
            return samplers.gaussian_array(rng, count, self.parameter)
        return [samplers.discrete_gaussian(rng, self.parameter) for _ in range(count)]


def to_grid(value: float, exponent: int) -> int:
    """round(value / 2^exponent), ties to even, exactly (a power-of-two shift, then rounding)."""
    return round(math.ldexp(value, -exponent))


def _sqrt_up(value: Fraction) -> float:
    """The smallest float whose square is ≥ value."""
    root = math.sqrt(float_up(value))
    while Fraction(root) ** 2 < value:
        root = math.nextafter(root, math.inf)
    while root > 0 and Fraction(math.nextafter(root, 0.0)) ** 2 >= value:
        root = math.nextafter(root, 0.0)
    return root


def _sqrt_down(value: Fraction) -> float:
    """The largest float whose square is ≤ value."""
    root = math.sqrt(float_down(value))
    while Fraction(root) ** 2 > value:
        root = math.nextafter(root, 0.0)
    while Fraction(math.nextafter(root, math.inf)) ** 2 <= value:
        root = math.nextafter(root, math.inf)
    return root


def rounded_variance(sigma: Fraction) -> Fraction:
    """σ² rounded up to a multiple of 2^-j, j ≥ 0 the least with relative excess ≤ 2^-20.

    More noise than asked by at most 2^-21 in σ, so the parameters of the
    vectorised sampler stay small; charges never assume more than σ.
    """
    variance = sigma * sigma
    denominator = 1
    while variance * denominator * _VARIANCE_ROUNDING < 1:
        denominator *= 2
    return Fraction(math.ceil(variance * denominator), denominator)


def laplace_plan(
    sensitivity: float, size: int, *, epsilon: Fraction | None = None, scale: float | None = None
) -> tuple[NoisePlan, Fraction]:
    """The discrete Laplace plan for `size` values of L1 sensitivity Δ, and its exact ε.

    With `epsilon` the scale is set so the rounded values' mechanism is exactly
    that ε-DP (the noise grows by the rounding's share instead of the charge);
    with `scale` (b) the ε is the rounded sensitivity over b. A discrete Laplace
    of scale t on integers with L1 sensitivity D is (D/t)-DP (the geometric
    mechanism; Ghosh, Roughgarden & Sundararajan 2009).
    """
    if (epsilon is None) == (scale is None):
        raise ValueError("give exactly one of epsilon and scale")
    requested = sensitivity / float(epsilon) if epsilon is not None else scale
    assert requested is not None
    exponent = _grid_exponent(requested, sensitivity / size)
    grid = Fraction(2) ** exponent
    # Integer L1 bound after rounding: Δ/g, plus 1 per value for the grid rounding and ½ per
    # value for the decimal-to-double parse of the request (|x − v| ≤ g/4 within the limit).
    units = math.floor(Fraction(sensitivity) / grid + Fraction(3 * size, 2))
    if epsilon is not None:
        scale_units = units / epsilon
    else:
        assert scale is not None
        scale_units = Fraction(scale) / grid
    plan = NoisePlan("discrete_laplace", exponent, scale_units, float_up(units * grid), size)
    return plan, units / scale_units


def gaussian_plan(
    sensitivity: float,
    size: int,
    *,
    sigma: float | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
) -> NoisePlan:
    """The discrete Gaussian plan for `size` values of L2 sensitivity Δ: std `sigma`, or the
    analytic-Gaussian σ (Balle & Wang 2018) for (ε, δ) at the *rounded* values' sensitivity.

    Its RDP is at most α·Δ_g²/(2σ²) with Δ_g = Δ + g·√d the rounded values'
    L2 sensitivity (CKS 2020: the discrete Gaussian's concentrated-DP bound for
    integer shifts, coordinate by coordinate, composed over independent
    coordinates) — the continuous Gaussian's curve.
    """
    if sigma is None:
        if epsilon is None or delta is None:
            raise ValueError("give sigma, or epsilon and delta")
        requested = calibrate.gaussian_sigma(epsilon, delta, sensitivity)
    else:
        requested = sigma
    exponent = _grid_exponent(requested, sensitivity / math.sqrt(size))
    grid = math.ldexp(1.0, exponent)
    # L2 bound after rounding: g·√d for the grid rounding and g·√d/2 for the request's parse.
    root = math.nextafter(1.5 * math.sqrt(size), math.inf)
    rounded = math.nextafter(sensitivity + grid * root, math.inf)
    if sigma is None:
        assert epsilon is not None and delta is not None
        sigma = calibrate.gaussian_sigma(epsilon, delta, rounded)
    variance = rounded_variance(Fraction(sigma) / Fraction(2) ** exponent)
    return NoisePlan("discrete_gaussian", exponent, variance, rounded, size)


def float_up(value: Fraction) -> float:
    """The smallest float ≥ value."""
    nearest = float(value)
    return nearest if Fraction(nearest) >= value else math.nextafter(nearest, math.inf)


def epsilon_up(value: Fraction) -> float:
    """The smallest float ε with both ε ≥ value and its decimal repr ≥ value.

    A pure ε is read back as the decimal its repr spells (accountant.members), so
    an ε charged as a float must be ≥ the truth in both readings.
    """
    epsilon = float_up(value)
    while Fraction(repr(epsilon)) < value:
        epsilon = math.nextafter(epsilon, math.inf)
    return epsilon


def float_down(value: Fraction) -> float:
    """The largest float ≤ value."""
    nearest = float(value)
    return nearest if Fraction(nearest) <= value else math.nextafter(nearest, -math.inf)
