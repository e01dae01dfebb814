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
   (Canonne, Kamath & Steinke 2020, Algorithms 1–3) — with integer and
   rational arithmetic only, from uniform integers cut from `os.urandom`.
3. The answer is the exact grid point g · (n + Z), converted to the nearest
   float. That conversion is post-processing of an exactly private integer;
   it is exact whenever |y| < 2^53 · g, and inputs are refused above
   2^52 · g so the noise keeps its resolution.

Rounding is part of the mechanism, so the sensitivity charged is that of the
rounded values: neighbouring inputs x, x' round to integers whose difference
is at most |x − x'| / g + 1 in every coordinate that differs. Hence, for d
values, the L1 sensitivity on the grid is ⌊Δ₁/g⌋ + d (an integer) and the L2
sensitivity is at most Δ₂/g + √d. docs/accounting.md ("Noise the service
adds") has the proof and the charges.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from accountant import calibrate
from service.domain.errors import InvalidRequest

__all__ = [
    "GRID_MARGIN_BITS",
    "Csprng",
    "NoisePlan",
    "bernoulli_exp",
    "discrete_gaussian",
    "discrete_laplace",
    "float_down",
    "float_up",
    "gaussian_plan",
    "laplace_plan",
    "to_grid",
]

# The grid is this many binary orders finer than the noise scale and the per-value sensitivity.
GRID_MARGIN_BITS = 12
# Inputs must satisfy |x| ≤ 2^52 · g: the noised grid point then converts to a float exactly.
_MAX_INPUT_UNITS = 1 << 52
_CHUNK_BYTES = 1 << 16

Distribution = Literal["discrete_laplace", "discrete_gaussian"]


class Csprng:
    """Uniform integers from the operating system's CSPRNG (`os.urandom`), read in chunks.

    Nothing else feeds the samplers: no seed, no PRNG state to recover. Bytes
    are consumed once and never reused; a fresh instance per release keeps
    leftovers from ever serving two answers.
    """

    __slots__ = ("_buffer", "_position")

    def __init__(self) -> None:
        self._buffer = b""
        self._position = 0

    def _take(self, size: int) -> bytes:
        if self._position + size > len(self._buffer):
            # Looked up at call time, so a test can observe (and only) this source.
            self._buffer = os.urandom(max(_CHUNK_BYTES, size))
            self._position = 0
        start = self._position
        self._position = start + size
        return self._buffer[start : self._position]

    def below(self, n: int) -> int:
        """A uniform integer in [0, n), by rejection on just enough random bits."""
        if n < 1:
            raise ValueError(f"below() needs n >= 1, got {n}")
        bits = (n - 1).bit_length()
        if bits == 0:
            return 0
        size = (bits + 7) // 8
        excess = size * 8 - bits
        while True:
            candidate = int.from_bytes(self._take(size), "little") >> excess
            if candidate < n:
                return candidate


def _bernoulli_exp_unit(rng: Csprng, num: int, den: int) -> bool:
    """Bernoulli(exp(−γ)) for γ = num/den in [0, 1] (CKS 2020, Alg. 1, first case)."""
    k = 1
    # Draw A_k ~ Bernoulli(γ/k) until one fails; P[the first failure is at an odd k] = e^-γ.
    while rng.below(den * k) < num:
        k += 1
    return k % 2 == 1


def bernoulli_exp(rng: Csprng, num: int, den: int) -> bool:
    """Bernoulli(exp(−num/den)) exactly, for integers num ≥ 0, den > 0 (CKS 2020, Alg. 1)."""
    if num < 0 or den <= 0:
        raise ValueError("bernoulli_exp needs num >= 0 and den > 0")
    # e^-γ = (e^-1)^⌊γ⌋ · e^-(γ − ⌊γ⌋): stop at the first factor that fails.
    while num > den:
        if not _bernoulli_exp_unit(rng, 1, 1):
            return False
        num -= den
    return _bernoulli_exp_unit(rng, num, den)


def discrete_laplace(rng: Csprng, scale: Fraction) -> int:
    """One draw with P[z] ∝ exp(−|z| / scale) on the integers (CKS 2020, Alg. 2)."""
    if scale <= 0:
        raise ValueError("the discrete Laplace scale must be > 0")
    t, s = scale.numerator, scale.denominator  # scale = t / s
    while True:
        u = rng.below(t)
        if not bernoulli_exp(rng, u, t):
            continue
        v = 0
        while bernoulli_exp(rng, 1, 1):
            v += 1
        magnitude = (u + t * v) // s  # u + t·v is Geometric(1 − e^{−1/t}); ⌊·/s⌋ rescales
        negative = rng.below(2) == 1
        if negative and magnitude == 0:
            continue  # keeps zero from being counted twice
        return -magnitude if negative else magnitude


def discrete_gaussian(rng: Csprng, sigma: Fraction) -> int:
    """One draw with P[z] ∝ exp(−z² / (2σ²)) on the integers (CKS 2020, Alg. 3)."""
    if sigma <= 0:
        raise ValueError("the discrete Gaussian's sigma must be > 0")
    variance = sigma * sigma
    a, b = variance.numerator, variance.denominator  # σ² = a / b
    t = math.isqrt(a // b) + 1  # ⌊σ⌋ + 1
    den = 2 * a * b * t * t
    while True:
        y = discrete_laplace(rng, Fraction(t))
        # Accept with probability exp(−(|y| − σ²/t)² / (2σ²)) = exp(−(|y|·b·t − a)² / (2·a·b·t²)).
        if bernoulli_exp(rng, (abs(y) * b * t - a) ** 2, den):
            return y


def _grid_exponent(scale: float, per_value_sensitivity: float) -> int:
    """k with 2^k ≤ 2^-GRID_MARGIN_BITS · min(scale, per-value sensitivity) < 2^(k+1)."""
    _, exponent = math.frexp(min(scale, per_value_sensitivity))  # x = m·2^e, m in [1/2, 1)
    return exponent - 1 - GRID_MARGIN_BITS


@dataclass(frozen=True)
class NoisePlan:
    """How one release's values are noised: the distribution, the grid and the exact scale.

    `scale` is in grid units and exact: the discrete Laplace's scale b/g, or
    the discrete Gaussian's σ/g. `sensitivity` is the sensitivity of the
    *rounded* values in value units (L1 for Laplace, L2 for Gaussian), the one
    the charge uses: at least the declared one.
    """

    distribution: Distribution
    grid_exponent: int
    scale: Fraction
    sensitivity: float
    size: int

    @property
    def grid(self) -> float:
        """The grid step g = 2^grid_exponent."""
        return math.ldexp(1.0, self.grid_exponent)

    @property
    def noise_scale(self) -> float:
        """The noise's scale in value units (Laplace b, Gaussian σ), rounded up."""
        return float_up(self.scale * Fraction(2) ** self.grid_exponent)

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
                    f"values[{index}] = {x!r} is beyond what the noise grid carries exactly at "
                    f"this noise scale (|value| ≤ {limit:.6g}: 2^52 grid steps of {self.grid:.6g})"
                )
        rng = Csprng()
        draw = discrete_laplace if self.distribution == "discrete_laplace" else discrete_gaussian
        shift = self.grid_exponent
        return [math.ldexp(float(to_grid(x, shift) + draw(rng, self.scale)), shift) for x in values]


def to_grid(value: float, exponent: int) -> int:
    """round(value / 2^exponent), ties to even, exactly (a power-of-two shift, then rounding)."""
    return round(math.ldexp(value, -exponent))


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
    units = math.floor(Fraction(sensitivity) / grid) + size  # integer L1 bound after rounding
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
    root = math.nextafter(math.sqrt(size), math.inf)
    rounded = math.nextafter(sensitivity + grid * root, math.inf)
    if sigma is None:
        assert epsilon is not None and delta is not None
        sigma = calibrate.gaussian_sigma(epsilon, delta, rounded)
    scale = Fraction(sigma) / Fraction(2) ** exponent
    return NoisePlan("discrete_gaussian", exponent, scale, rounded, size)


def float_up(value: Fraction) -> float:
    """The smallest float ≥ value."""
    nearest = float(value)
    return nearest if Fraction(nearest) >= value else math.nextafter(nearest, math.inf)


def float_down(value: Fraction) -> float:
    """The largest float ≤ value."""
    nearest = float(value)
    return nearest if Fraction(nearest) <= value else math.nextafter(nearest, -math.inf)
