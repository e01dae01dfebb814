"""Exact discrete samplers fed only by the OS's CSPRNG (Canonne, Kamath & Steinke 2020).

Every draw is exact: Bernoulli(e^−γ) by the alternating series (CKS Alg. 1),
discrete Laplace from a geometric (Alg. 2), discrete Gaussian by rejection
from a discrete Laplace (Alg. 3), with integer and rational arithmetic only,
and uniform integers cut by rejection from `os.urandom`. No float touches a
draw, no seed exists, no PRNG state can be recovered from the outputs.

Two implementations of the same algorithms:
- scalar (`discrete_laplace`, `discrete_gaussian`): Python integers of any
  size, for any rational parameter;
- vectorised (`laplace_array`, `gaussian_array`): the same steps on numpy
  int64 arrays, every element running its own rejection loop under a mask.
  They take parameters small enough that every intermediate fits in 62 bits
  (`fits_laplace`, `fits_gaussian`); the few elements that would not (a
  geometric tail past 60 steps, a Gaussian candidate far in the tail) finish
  on the scalar path, exactly, so nothing is truncated or approximated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import numpy.typing as npt

__all__ = [
    "Csprng",
    "bernoulli_exp",
    "discrete_gaussian",
    "discrete_laplace",
    "fits_gaussian",
    "fits_laplace",
    "gaussian_array",
    "laplace_array",
]

_CHUNK_BYTES = 1 << 16
# Vectorised comparisons multiply a denominator by a counter k ≤ _MAX_ROUNDS: both stay < 2^62.
_MAX_DENOMINATOR = 1 << 56
_MAX_ROUNDS = 60
_INT64_SAFE = 1 << 62
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


class Csprng:
    """Uniform integers from the operating system's CSPRNG (`os.urandom`).

    Nothing else feeds the samplers. Bytes are consumed once and never reused;
    a fresh instance per release keeps leftovers from ever serving two answers.
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

    def words(self, count: int) -> npt.NDArray[np.uint64]:
        """`count` uniform 64-bit words."""
        return np.frombuffer(os.urandom(8 * count), dtype=np.uint64)

    def below_array(self, n: Ints) -> Ints:
        """Element-wise uniform integers in [0, n_i), for 1 ≤ n_i < 2^62, by rejection."""
        # frexp's exponent is the bit length of n − 1 (one more where the float rounded up to a
        # power of two: a wider mask, more rejections, the same exact distribution).
        _, bits = np.frexp((n - 1).astype(np.float64))
        mask = (np.uint64(1) << bits.astype(np.uint64)) - np.uint64(1)
        out = np.empty(n.shape, dtype=np.int64)
        todo = np.arange(n.size)
        while todo.size:
            candidate = (self.words(todo.size) & mask[todo]).astype(np.int64)
            accepted = candidate < n[todo]
            out[todo[accepted]] = candidate[accepted]
            todo = todo[~accepted]
        return out


# Scalar samplers (any size) ------------------------------------------------------------------


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


def _geometric_tail(rng: Csprng, v: int) -> int:
    """Continue counting successes of Bernoulli(e^-1) from `v` until the first failure."""
    while bernoulli_exp(rng, 1, 1):
        v += 1
    return v


def discrete_laplace(rng: Csprng, scale: Fraction) -> int:
    """One draw with P[z] ∝ exp(−|z| / scale) on the integers (CKS 2020, Alg. 2)."""
    if scale <= 0:
        raise ValueError("the discrete Laplace scale must be > 0")
    t, s = scale.numerator, scale.denominator  # scale = t / s
    while True:
        u = rng.below(t)
        if not bernoulli_exp(rng, u, t):
            continue
        v = _geometric_tail(rng, 0)
        magnitude = (u + t * v) // s  # u + t·v is Geometric(1 − e^{−1/t}); ⌊·/s⌋ rescales
        negative = rng.below(2) == 1
        if negative and magnitude == 0:
            continue  # keeps zero from being counted twice
        return -magnitude if negative else magnitude


def _gaussian_accepts(rng: Csprng, y: int, variance: Fraction, t: int) -> bool:
    """Accept y with probability exp(−(|y| − σ²/t)² / (2σ²)) (CKS 2020, Alg. 3, step 4)."""
    a, b = variance.numerator, variance.denominator  # σ² = a / b
    # (|y| − a/(b t))² / (2a/b) = (|y|·b·t − a)² / (2·a·b·t²)
    return bernoulli_exp(rng, (abs(y) * b * t - a) ** 2, 2 * a * b * t * t)


def discrete_gaussian(rng: Csprng, variance: Fraction) -> int:
    """One draw with P[z] ∝ exp(−z² / (2σ²)) on the integers, σ² = `variance` (CKS 2020, Alg. 3)."""
    if variance <= 0:
        raise ValueError("the discrete Gaussian's variance must be > 0")
    t = math.isqrt(variance.numerator // variance.denominator) + 1  # ⌊σ⌋ + 1
    while True:
        y = discrete_laplace(rng, Fraction(t))
        if _gaussian_accepts(rng, y, variance, t):
            return y


# Vectorised samplers (int64, same algorithms) ------------------------------------------------


def _bernoulli_exp_unit_array(rng: Csprng, num: Ints, den: Ints) -> Bools:
    """Element-wise Bernoulli(exp(−num/den)) for num ≤ den < 2^56 (CKS 2020, Alg. 1)."""
    counter = np.ones(num.size, dtype=np.int64)
    active = np.arange(num.size)
    k = 1
    while active.size and k <= _MAX_ROUNDS:
        success = rng.below_array(den[active] * k) < num[active]
        active = active[success]
        counter[active] += 1
        k += 1
    for index in active.tolist():  # past 60 rounds (probability < 1/60!): finish exactly
        kk = int(counter[index])
        while rng.below(int(den[index]) * kk) < int(num[index]):
            kk += 1
        counter[index] = kk
    odd: Bools = (counter % 2) == 1
    return odd


def _bernoulli_exp_array(rng: Csprng, num: Ints, den: Ints) -> Bools:
    """Element-wise Bernoulli(exp(−num/den)), num ≥ 0, 0 < den < 2^56 (CKS 2020, Alg. 1)."""
    whole, fraction = np.divmod(num, den)
    alive = np.ones(num.size, dtype=np.bool_)
    unit = np.ones(num.size, dtype=np.int64)
    done = 0
    # One Bernoulli(e^-1) per whole unit of γ; an element dies at its first failure.
    while True:
        pending = np.flatnonzero(alive & (whole > done))
        if not pending.size:
            break
        alive[pending] = _bernoulli_exp_unit_array(rng, unit[pending], unit[pending])
        done += 1
    survivors = np.flatnonzero(alive)
    if survivors.size:
        alive[survivors] = _bernoulli_exp_unit_array(rng, fraction[survivors], den[survivors])
    return alive


def fits_laplace(scale: Fraction) -> bool:
    """Whether `laplace_array` takes this scale (t < 2^56 and s < 2^62 for t/s)."""
    return scale.numerator < _MAX_DENOMINATOR and scale.denominator < _INT64_SAFE


def _laplace_attempts(rng: Csprng, attempts: int, t: int, s: int) -> list[int]:
    """Run CKS 2020 Alg. 2 `attempts` times side by side; the accepted draws, in attempt order.

    Each attempt is independent, so the accepted ones are independent draws of the discrete
    Laplace (t/s); any number of them, taken in attempt order, is an exact sample.
    """
    width = np.full(attempts, t, dtype=np.int64)
    u = rng.below_array(width)
    kept = np.flatnonzero(_bernoulli_exp_array(rng, u, width))
    v = np.zeros(kept.size, dtype=np.int64)
    alive = np.arange(kept.size)
    rounds = 0
    while alive.size and rounds < _MAX_ROUNDS:
        ones = np.ones(alive.size, dtype=np.int64)
        alive = alive[_bernoulli_exp_unit_array(rng, ones, ones)]
        v[alive] += 1
        rounds += 1
    magnitude = (u[kept] + t * v) // s
    negative = rng.below_array(np.full(kept.size, 2, dtype=np.int64)) == 1
    signed: list[int] = np.where(negative, -magnitude, magnitude).tolist()
    for index in alive.tolist():  # a geometric past 60 steps (probability e^-60): exactly
        long = (int(u[kept[index]]) + t * _geometric_tail(rng, int(v[index]))) // s
        signed[index] = -long if negative[index] else long
    # (negative, 0) is rejected: it keeps zero from being counted twice.
    return [z for z, minus in zip(signed, negative.tolist(), strict=True) if z or not minus]


def _collect(draw: Callable[[int], list[int]], size: int, rate: float) -> list[int]:
    """`size` accepted draws from batches of attempts sized by the acceptance `rate` (so one or
    two batches usually do), in attempt order."""
    out: list[int] = []
    while len(out) < size:
        missing = size - len(out)
        out.extend(draw(math.ceil(missing / rate) + 16))
    return out[:size]


def laplace_array(rng: Csprng, size: int, scale: Fraction) -> list[int]:
    """`size` independent draws of `discrete_laplace(rng, scale)`, vectorised."""
    if not fits_laplace(scale) or scale <= 0:
        raise ValueError("laplace_array needs 0 < scale with t < 2^56, s < 2^62 (scale = t/s)")
    t, s = scale.numerator, scale.denominator
    # An attempt survives step 2 with probability ≈ (1 − e^-1) ≈ 0.63 (less the rare zeros).
    return _collect(lambda attempts: _laplace_attempts(rng, attempts, t, s), size, 0.55)


def fits_gaussian(variance: Fraction) -> bool:
    """Whether `gaussian_array` takes this σ² (its rejection step's denominator < 2^56)."""
    a, b = variance.numerator, variance.denominator
    t = math.isqrt(a // b) + 1
    return 2 * a * b * t * t < _MAX_DENOMINATOR


def gaussian_array(rng: Csprng, size: int, variance: Fraction) -> list[int]:
    """`size` independent draws of `discrete_gaussian(rng, variance)`, vectorised."""
    if variance <= 0 or not fits_gaussian(variance):
        raise ValueError("gaussian_array needs 0 < σ² with 2·a·b·t² < 2^56 (σ² = a/b)")
    a, b = variance.numerator, variance.denominator
    t = math.isqrt(a // b) + 1
    den = 2 * a * b * t * t
    # |y|·b·t − a below this keeps its square in int64; beyond it (far in the tail) exactly.
    limit = math.isqrt(_INT64_SAFE)

    def attempts(count: int) -> list[int]:
        candidates = np.asarray(laplace_array(rng, count, Fraction(t)), dtype=np.int64)
        centred = np.abs(candidates) * (b * t) - a
        small = np.abs(centred) < limit
        accepted = np.zeros(count, dtype=np.bool_)
        index = np.flatnonzero(small)
        accepted[index] = _bernoulli_exp_array(
            rng, centred[index] * centred[index], np.full(index.size, den, dtype=np.int64)
        )
        for far in np.flatnonzero(~small).tolist():
            accepted[far] = _gaussian_accepts(rng, int(candidates[far]), variance, t)
        kept: list[int] = candidates[accepted].tolist()
        return kept

    # Alg. 3 accepts a candidate with probability about 0.6–0.8 (measured); the rate only sizes
    # the batches of attempts, never the distribution.
    return _collect(attempts, size, 0.5)
