"""Exact discrete samplers fed only by the OS's CSPRNG (Canonne, Kamath & Steinke 2020).

Every draw is exact: Bernoulli(e^−γ) by the alternating series (CKS Alg. 1),
discrete Laplace from a geometric (Alg. 2), discrete Gaussian by rejection
from a discrete Laplace (Alg. 3), with integer and rational arithmetic only,
and uniform integers cut by rejection from `os.urandom`. No float touches a
draw, no seed exists, no PRNG state can be recovered from the outputs.

Three implementations:
- scalar (`discrete_laplace`, `discrete_gaussian`): Python integers of any
  size, for any rational parameter;
- vectorised (`laplace_array`, `gaussian_array`): the same steps on numpy
  int64 arrays, every element running its own rejection loop under a mask.
  They take parameters small enough that every intermediate fits in 62 bits
  (`fits_laplace`, `fits_gaussian`); the few elements that would not (a
  geometric tail past 60 steps, a Gaussian candidate far in the tail) finish
  on the scalar path, exactly, so nothing is truncated or approximated;
- inversion (`GaussianTable`, `gaussian_table`) for a discrete Gaussian of σ up
  to about 1,390 (the noise on vote counts): a uniform U's bits, 64 at a time,
  against rigorous integer bounds of the CDF, so a draw costs a word and a
  binary search (about 0.1 µs against 15 µs by rejection) and stays exact:
  a word that falls on a boundary draws more words against tighter bounds.
  docs/accounting.md §8 has the argument.
"""

from __future__ import annotations

import decimal
import functools
import itertools
import math
import os
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import numpy.typing as npt

__all__ = [
    "Csprng",
    "GaussianTable",
    "bernoulli_exp",
    "discrete_gaussian",
    "discrete_laplace",
    "fits_gaussian",
    "fits_laplace",
    "fits_table",
    "gaussian_array",
    "gaussian_table",
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


# Inversion with lazily refined bounds (small σ) ----------------------------------------------
#
# The discrete Gaussian's CDF B(z) = P[Z ≤ z] is irrational, but a uniform U on [0, 1) lies in
# [B(z − 1), B(z)) for exactly one z, and that z has the discrete Gaussian's law. U is drawn a
# 64-bit word at a time: its first m bits v say U ∈ [v/2^m, (v + 1)/2^m). For each boundary we
# know integers lo ≤ B·2^m ≤ up (rigorous fixed-point bounds, below); v < lo proves U < B and
# v ≥ up proves U ≥ B, so one word settles the draw unless it falls on a boundary's own word
# (probability about 2^-64 · boundaries), and then more words and tighter bounds settle it. No
# float touches a bound, nothing is truncated: the law is exact.

# The table covers |z| ≤ n with n ≥ σ·√(2·100·ln 2): everything past it weighs under 2^-100 of
# the centre and is still sampled, exactly, by the refinement path.
_TAIL_BITS = 100
# Tables of more boundaries than this are not built: the int64 samplers serve larger σ.
_TABLE_MAX_HALF_WIDTH = 1 << 14
_WORD_BITS = 64


def _exp_neg_fixed(num: int, den: int, bits: int) -> int:
    """An integer within 2 of exp(−num/den)·2^bits, for num/den ≥ 0.

    Decimal's exp is correctly rounded; with ⌊0.30103·bits⌋ + 17 digits the two roundings
    before it (the quotient, the scaling) move the result by far less than one unit, and the
    truncation by less than one more. A private context (the caller's traps do not apply):
    an exp that underflows is 0, still within 2 units.
    """
    digits = bits * 30103 // 100000 + 17
    context = decimal.Context(
        prec=digits,
        rounding=decimal.ROUND_HALF_EVEN,
        Emin=-(10**9),
        Emax=10**9,
        traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
    )
    with decimal.localcontext(context):
        value = (-(decimal.Decimal(num) / decimal.Decimal(den))).exp()
        return int(value * (decimal.Decimal(2) ** bits))


class _Bounds:
    """Fixed-point weights W_z = exp(−z²/(2σ²))·2^p for 0 ≤ z ≤ N with a rigorous error.

    ŝ_z = exp(−(2z + 1)/(2σ²)) and ŵ_{z+1} = ŵ_z·ŝ_z by the recurrence ŝ_{z+1} = ŝ_z·r̂, each
    product truncated to p bits: with |r̂ − r| ≤ 2 and |ŝ_0 − s_0| ≤ 2 units, induction gives
    |ŝ_z − s_z| ≤ 4z + 2 and |ŵ_z − W_z| ≤ 2z(z + 1) units (every factor is ≤ 1). The mass past
    N is T ≤ W_{N+1}/(1 − s_{N+1}) (the ratios W_{z+1}/W_z = s_z decrease).
    """

    def __init__(self, variance: Fraction, half_width: int, bits: int) -> None:
        a, b = variance.numerator, variance.denominator  # σ² = a/b: 1/(2σ²) = b/(2a)
        width = half_width
        # p: the boundary bits asked for, plus room for the error sums (≤ 4(N + 2)³ units).
        p = bits + 3 * (width + 2).bit_length() + 8
        one = 1 << p
        ratio = _exp_neg_fixed(2 * b, 2 * a, p)  # exp(−1/σ²)
        step = _exp_neg_fixed(b, 2 * a, p)  # exp(−1/(2σ²))
        weights = [one]
        for _ in range(width + 1):
            weights.append((weights[-1] * step) >> p)
            step = (step * ratio) >> p
        # Now weights[z] = ŵ_z for z ≤ N + 1 and step = ŝ_{N+1}.
        error_w = 2 * (width + 1) * (width + 2)
        error_s = 4 * (width + 1) + 2
        denominator = one - step - error_s
        if denominator <= 0:
            raise ValueError("the table is too narrow for this σ")
        self.tail = -(-((weights[width + 1] + error_w) << p) // denominator)
        self.bits = bits
        self.width = width
        prefix = []
        running = 0
        for w in weights[: width + 1]:
            running += w
            prefix.append(running)
        self._prefix = prefix  # P_k = Σ_{j ≤ k} ŵ_j
        # Any sum of the ŵ's below is off by at most this many units.
        self._error = 2 * (width + 1) * error_w + 2

    def boundary(self, index: int) -> tuple[int, int]:
        """(lo, up) with lo ≤ B(z)·2^bits ≤ up for z = index − N − 1, 0 ≤ index ≤ 2N + 1."""
        n, prefix, error = self.width, self._prefix, self._error
        z = index - n - 1
        total = prefix[n]
        # Mass on [−N, z] (A) and on [z + 1, N] (D), beside the tails T on either side.
        if z < 0:
            m = -z
            below = total - prefix[m - 1] if m <= n else 0  # m ≥ 1
            above = total + prefix[m - 1] - prefix[0]
        else:
            below = total - prefix[0] + prefix[z]
            above = total - prefix[z]
        below_lo, below_hi = max(0, below - error), below + error
        above_lo, above_hi = max(0, above - error), above + error
        lo = up = None
        for tail in (0, self.tail):  # B = (T + A)/(2T + A + D) is monotone in T
            low = ((tail + below_lo) << self.bits) // (2 * tail + below_lo + above_hi)
            high = -((-(tail + below_hi) << self.bits) // (2 * tail + below_hi + above_lo))
            lo = low if lo is None else min(lo, low)
            up = high if up is None else max(up, high)
        assert lo is not None and up is not None
        return lo, up


class GaussianTable:
    """Exact discrete Gaussian draws N_Z(0, σ²) by inversion of U's bits (see above)."""

    def __init__(self, variance: Fraction, *, word_bits: int = _WORD_BITS) -> None:
        if variance <= 0:
            raise ValueError("the discrete Gaussian's variance must be > 0")
        if not 1 <= word_bits <= _WORD_BITS:
            raise ValueError(f"word_bits must be from 1 to {_WORD_BITS}")
        self.variance = variance
        self._word_bits = word_bits
        self._half_width = _half_width(variance)
        bounds = _Bounds(variance, self._half_width, word_bits)
        pairs = [bounds.boundary(i) for i in range(2 * self._half_width + 2)]
        # Lowering a lo or raising an up only widens what counts as undecided: both stay sound,
        # and make the arrays monotone for the search.
        lo = list(itertools.accumulate(reversed([p[0] for p in pairs]), min))[::-1]
        up = list(itertools.accumulate([p[1] for p in pairs], max))
        top = (1 << word_bits) - 1
        self._lo = np.array(lo, dtype=np.uint64)
        # An up of 2^bits can never be reached by a word: the largest word is left undecided.
        self._up = np.array([min(x, top) for x in up], dtype=np.uint64)
        self._top = np.uint64(top)
        self._shift = np.uint64(_WORD_BITS - word_bits)
        self._refined: dict[tuple[int, int], _Bounds] = {}

    def draw(self, rng: Csprng, count: int) -> list[int]:
        """`count` independent draws."""
        words = rng.words(count) >> self._shift
        index = np.searchsorted(self._lo, words, side="right")
        # index − 1 is the last boundary with lo ≤ word; the word decides when it is also ≥ its up.
        # index 0: U below the table's first boundary; index = len: above its last (the tails).
        settled = (index > 0) & (index < self._lo.size) & (words != self._top)
        settled[settled] = words[settled] >= self._up[index[settled] - 1]
        out: list[int] = (index - (self._half_width + 1)).tolist()
        for i in np.flatnonzero(~settled).tolist():
            out[i] = self._refine(rng, int(words[i]), self._word_bits)
        return out

    def _bounds(self, half_width: int, bits: int) -> _Bounds:
        key = (half_width, bits)
        bounds = self._refined.get(key)
        if bounds is None:
            if len(self._refined) >= 8:  # refinement is rare: keep only the last few
                self._refined.clear()
            bounds = self._refined[key] = _Bounds(self.variance, half_width, bits)
        return bounds

    def _refine(self, rng: Csprng, word: int, bits: int) -> int:
        """The draw whose first `bits` bits are `word`: more bits, and where U may lie past the
        table a wider table, until a boundary pair settles it."""
        half_width = self._half_width
        while True:
            word = (word << _WORD_BITS) | int(rng.words(1)[0])
            bits += _WORD_BITS
            # The tail mass past the table must shrink with the bits, or it alone keeps U's
            # boundary undecided.
            half_width = max(half_width, _half_width(self.variance, bits + 32))
            found = _locate(self._bounds(half_width, bits), word)
            if found == "tail":
                half_width *= 2
            elif found is not None:
                return int(found)


def _locate(bounds: _Bounds, word: int) -> int | str | None:
    """z if `word` (U's first bits) settles it against these bounds, "tail" if U may lie past
    them, None if it falls on a boundary's undecided word."""

    def side(index: int) -> int:  # −1: U < B, +1: U ≥ B, 0: undecided
        lo, up = bounds.boundary(index)
        return -1 if word < lo else (1 if word >= up else 0)

    last = 2 * bounds.width + 1
    if side(0) != 1 or side(last) != -1:
        return "tail"
    low, high = 0, last  # side(low) = +1, side(high) = −1
    while high - low > 1:
        middle = (low + high) // 2
        s = side(middle)
        if s == 0:
            return None
        if s == 1:
            low = middle
        else:
            high = middle
    return high - bounds.width - 1


def _half_width(variance: Fraction, tail_bits: int = _TAIL_BITS) -> int:
    """n with n + 1 ≥ σ·√(2·tail_bits·ln 2): W_{n+1} ≤ 2^-tail_bits."""
    sigma = math.sqrt(variance.numerator / variance.denominator)
    return max(2, math.ceil(sigma * math.sqrt(2 * tail_bits * math.log(2))) + 1)


def fits_table(variance: Fraction) -> bool:
    """Whether `gaussian_table` builds a table for this σ² (σ up to about 1,390)."""
    return variance > 0 and _half_width(variance) <= _TABLE_MAX_HALF_WIDTH


@functools.lru_cache(maxsize=32)
def gaussian_table(variance: Fraction) -> GaussianTable:
    """The (cached) inversion table for N_Z(0, σ²); `fits_table(variance)` must hold."""
    if not fits_table(variance):
        raise ValueError("gaussian_table takes σ up to about 1,390 (fits_table)")
    return GaussianTable(variance)
