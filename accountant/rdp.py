"""RDP curves of the mechanisms the ledger charges, and the ε conversion.

Every function returns a curve: one Rényi-DP value per order of `orders`
(add/remove-one neighbours). Curves compose by addition. All arithmetic is in
log space; an order whose value cannot be computed accurately is reported as
+inf (that order then simply never helps), never as a lower number.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import special

from accountant import _checks
from accountant._checks import FloatArray
from accountant.orders import DEFAULT_ORDERS

__all__ = ["gaussian", "laplace", "pure_dp", "subsampled_gaussian", "to_epsilon"]

Orders = Sequence[float] | npt.ArrayLike

# Stop a series once its last term is this far (in log) below the partial sum:
# e^-27.6 ≈ 1e-12. The term is then added as a bound on the remainder.
_SERIES_TAIL_LOG = 27.6
# Enough for every σ ≥ 1e-3 and σ ≤ 1e6 at any q (q near 1/2 with huge σ needs the most);
# below σ ≈ 1e-5 the series cannot settle in double precision at all, and a larger cap
# only cost seconds and gigabytes (2^21 terms: 14 s, 1.7 GB on DEFAULT_ORDERS) for nothing.
_SERIES_MAX_TERMS = 1 << 17
_ULP = float(np.finfo(np.float64).eps)
# Below this σ, subsampled curves are bounded by the plain Gaussian's instead of summed.
_SERIES_MIN_SIGMA = 1e-3


def subsampled_gaussian(
    sample_rate: float,
    noise_multiplier: float,
    steps: int = 1,
    orders: Orders = DEFAULT_ORDERS,
) -> FloatArray:
    """RDP of `steps` Poisson-subsampled Gaussian steps (DP-SGD).

    Mironov, Talwar, Zhang 2019, "Rényi DP of the Sampled Gaussian Mechanism":
    ε(α) = log(A_α)/(α-1) per step, A_α from Sec. 3.2 (integer α, exact
    binomial sum) and Sec. 3.3 (fractional α, two convergent series). With
    sample_rate = 1 this is the plain Gaussian mechanism.
    """
    q = _checks.sample_rate("sample_rate", sample_rate)
    sigma = _checks.positive("noise_multiplier", noise_multiplier)
    k = _checks.count("steps", steps)
    return subsampled_gaussian_unchecked(q, sigma, k, _checks.orders(orders))


def subsampled_gaussian_unchecked(
    q: float, sigma: float, steps: int, grid: FloatArray
) -> FloatArray:
    """`subsampled_gaussian` for arguments already validated (the calibration's inner loop)."""
    if q == 1.0 or sigma < _SERIES_MIN_SIGMA:
        # Below _SERIES_MIN_SIGMA the series only cost time (the ε is astronomical anyway):
        # the plain Gaussian curve is a valid upper bound (see the quasi-convexity note below).
        return _gaussian_curve(sigma, grid) * steps
    is_int = grid == np.floor(grid)
    log_a = np.empty_like(grid)
    if np.any(is_int):
        log_a[is_int] = _log_a_integer(q, sigma, grid[is_int])
    if np.any(~is_int):
        log_a[~is_int] = _log_a_fractional(q, sigma, grid[~is_int])
    # Subsampling never costs more than the plain Gaussian (Rényi divergence is jointly
    # quasi-convex: van Erven & Harremoës 2014, Thm. 13), so where a series did not
    # settle (+inf) the Gaussian value α/(2σ²) is still a valid, finite bound.
    with np.errstate(over="ignore", divide="ignore"):
        return _finalize(np.minimum(log_a / (grid - 1.0), grid / (2.0 * sigma * sigma)) * steps)


def gaussian(
    noise_multiplier: float, steps: int = 1, orders: Orders = DEFAULT_ORDERS
) -> FloatArray:
    """RDP of `steps` Gaussian releases with std = noise_multiplier × L2 sensitivity.

    Mironov 2017, Prop. 7: ε(α) = α / (2σ²).
    """
    sigma = _checks.positive("noise_multiplier", noise_multiplier)
    k = _checks.count("steps", steps)
    return _gaussian_curve(sigma, _checks.orders(orders)) * k


def laplace(scale: float, steps: int = 1, orders: Orders = DEFAULT_ORDERS) -> FloatArray:
    """RDP of `steps` Laplace releases with scale b relative to L1 sensitivity.

    Mironov 2017, Prop. 6 (Table II): ε(α) = 1/(α-1) · log(α/(2α-1) e^{(α-1)/b}
    + (α-1)/(2α-1) e^{-α/b}), evaluated as 1/b + log1p((α-1)(e^{(1-2α)/b}-1)/(2α-1))/(α-1).
    """
    b = _checks.positive("scale", scale)
    k = _checks.count("steps", steps)
    grid = _checks.orders(orders)
    eps = 1.0 / b
    curve = eps + np.log1p(
        (grid - 1.0) * np.expm1((1.0 - 2.0 * grid) * eps) / (2.0 * grid - 1.0)
    ) / (grid - 1.0)
    # The exact value never exceeds the pure-DP bound ε; clip rounding noise upward only.
    return _finalize(np.minimum(np.maximum(curve, 0.0), eps) * k)


def pure_dp(epsilon: float, steps: int = 1, orders: Orders = DEFAULT_ORDERS) -> FloatArray:
    """RDP of `steps` ε-DP releases (e.g. the exponential mechanism).

    Bun & Steinke 2016, Prop. 3.3 (tight form): an ε-DP mechanism is
    (α, 1/(α-1) · log((sinh(αε) - sinh((α-1)ε)) / sinh(ε)))-RDP, which equals the
    randomized-response value 1/(α-1) · log((e^{αε} + e^{(1-α)ε}) / (1 + e^ε)).
    """
    eps = _checks.positive("epsilon", epsilon)
    k = _checks.count("steps", steps)
    grid = _checks.orders(orders)
    # The ratio is 1 + x, x = expm1((α-1)ε)·expm1(αε)·e^{-(α-1)ε}/(1+e^ε): a product of
    # positive factors, so log1p(x) keeps full precision at small ε, where log(num) - log(den)
    # cancels (it came out 1% low at ε = 1e-6 and 0 below ε ≈ 1e-8).
    u = (grid - 1.0) * eps
    log_x = _log_expm1(u) + _log_expm1(grid * eps) - u - np.logaddexp(0.0, eps)
    curve = np.logaddexp(0.0, log_x) / (grid - 1.0)
    # Both min-terms are proven upper bounds (D_∞ ≤ ε; zCDP αε²/2); they only tame rounding.
    return _finalize(np.minimum(np.maximum(curve, 0.0), np.minimum(eps, grid * eps * eps / 2)) * k)


def to_epsilon(
    rdp: npt.ArrayLike, delta: float, orders: Orders = DEFAULT_ORDERS
) -> tuple[float, float]:
    """(ε, α) for an RDP curve at δ, minimised over the orders.

    Balle, Barthe, Gaboardi, Hsu, Sato 2020, Prop. 12: (α, ρ)-RDP implies
    (ρ + log(1-1/α) - (log δ + log α)/(α-1), δ)-DP. Where ρ < -log(1-δ²), the
    mechanism is (0, δ)-DP outright (KL ≤ ρ and Bretagnolle–Huber, as in
    dp_accounting). Never negative, never NaN; +inf when no order gives a
    finite bound; 0 for an all-zero curve.
    """
    d = _checks.open_probability("delta", delta)
    grid = _checks.orders(orders)
    return to_epsilon_unchecked(_checks.rdp_curve(rdp, grid), d, grid)


def to_epsilon_unchecked(curve: FloatArray, delta: float, grid: FloatArray) -> tuple[float, float]:
    """`to_epsilon` for arguments already validated."""
    per_order = epsilon_per_order_unchecked(curve, delta, grid)
    best = int(np.argmin(per_order))
    return max(0.0, float(per_order[best])), float(grid[best])


def conversion_offset(delta: float, grid: FloatArray) -> FloatArray:
    """log(1-1/α) - (log δ + log α)/(α-1): ε of a zero RDP value per order (Balle et al. 2020)."""
    return np.log1p(-1.0 / grid) - (math.log(delta) + np.log(grid)) / (grid - 1.0)


def epsilon_per_order_unchecked(curve: FloatArray, delta: float, grid: FloatArray) -> FloatArray:
    """ε at δ from each order on its own (their minimum is `to_epsilon`); arguments validated."""
    with np.errstate(over="ignore"):
        per_order = curve + conversion_offset(delta, grid)
    kl_zero = delta * delta + np.expm1(-curve) > 0.0
    return np.where(kl_zero, 0.0, per_order)


def _log_expm1(x: FloatArray) -> FloatArray:
    """log(e^x - 1) for x > 0, stable for small and large x."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.asarray(x + np.log(-np.expm1(-x)), dtype=np.float64)


def _gaussian_curve(sigma: float, grid: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", over="ignore"):  # σ² underflows to 0 for tiny σ: +inf
        return _finalize(grid / (2.0 * sigma * sigma))


def _finalize(curve: FloatArray) -> FloatArray:
    """Map anything not finite (overflow, a failed series) to +inf: never NaN, never lower."""
    curve = np.where(np.isnan(curve), np.inf, curve)
    return np.maximum(curve, 0.0)


def _logsumexp(terms: FloatArray) -> FloatArray:
    """log Σ exp(terms) along the last axis; -inf for a row of -inf. (Leaner than scipy's.)"""
    peak = np.max(terms, axis=-1)
    shift = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.asarray(shift + np.log(np.sum(np.exp(terms - shift[..., None]), axis=-1)))


@functools.lru_cache(maxsize=64)
def _log_binomials(alphas: tuple[float, ...], start: int, stop: int) -> FloatArray:
    """log|C(α, i)| for each α and i in [start, stop): σ- and q-free, so cached."""
    a = np.asarray(alphas)[:, None]
    i = np.arange(start, stop, dtype=np.float64)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        # gammaln is log|Γ|, so this is log|C(α, i)| also for i > α with α fractional.
        table = special.gammaln(a + 1.0) - special.gammaln(i + 1.0) - special.gammaln(a - i + 1.0)
    table = np.where(np.isnan(table), -np.inf, table)
    table.setflags(write=False)
    return table


def _log_a_integer(q: float, sigma: float, alphas: FloatArray) -> FloatArray:
    """log A_α for integer α (MTZ 2019, Sec. 3.2).

    A_α = Σ_i C(α,i) (1-q)^{α-i} q^i e^{(i²-i)/(2σ²)}. Since the binomial weights
    sum to one, A_α = 1 + Σ_{i≥2} C(α,i)(1-q)^{α-i} q^i (e^{(i²-i)/(2σ²)} - 1):
    all terms positive, so log A_α = log1p(S) keeps full relative precision
    even when A_α - 1 is tiny (large σ), where a plain log-sum-exp would not.
    """
    top = int(alphas.max())
    i = np.arange(2, top + 1, dtype=np.float64)
    a = alphas[:, None]
    x = (i * i - i) / (2.0 * sigma * sigma)
    with np.errstate(invalid="ignore"):
        terms = _log_binomials(tuple(alphas), 2, top + 1) + i * math.log(q)
        terms = terms + (a - i) * math.log1p(-q) + _log_expm1(x)
    terms = np.where(i[None, :] <= a, terms, -np.inf)
    return np.asarray(np.logaddexp(0.0, _logsumexp(terms)), dtype=np.float64)


def _log_a_fractional(q: float, sigma: float, alphas: FloatArray) -> FloatArray:
    """log A_α for fractional α (MTZ 2019, Sec. 3.3), never below the true value.

    A_α = A_0 + A_1, split at z0 = σ² log(1/q - 1) + 1/2, each a binomial series:
      A_0 = Σ_i C(α,i) q^i (1-q)^{α-i} e^{(i²-i)/(2σ²)} · ½ erfc((i - z0)/(√2 σ)),
      A_1 = Σ_i C(α,i) q^{α-i} (1-q)^i e^{((α-i)²-(α-i))/(2σ²)} · ½ erfc((z0 - (α-i))/(√2 σ)).
    C(α,i) > 0 for i ≤ ⌊α⌋+1 and alternates in sign after. We sum with signs
    (dp_accounting adds |C(α,i)|, an upper bound that is loose at small α and
    large q) and stop once the magnitudes are falling and the last term t_m is
    below 1e-12 of the sum: an alternating series with falling magnitudes has
    |remainder| ≤ |t_m|, so we report partial sum + |t_m| + a rounding margin,
    an upper bound within ~1e-12 (absolute, in log A) of the truth. An order
    whose series has not settled after _SERIES_MAX_TERMS terms is +inf here (the
    caller then uses the Gaussian bound).
    """
    z0 = sigma * sigma * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    two_var = 2.0 * sigma * sigma
    log_pos = np.full(alphas.shape, -np.inf)
    log_neg = np.full(alphas.shape, -np.inf)
    result = np.full(alphas.shape, np.inf)
    open_rows = np.arange(alphas.size)
    start, width = 0, 64
    while open_rows.size and start < _SERIES_MAX_TERMS:
        a = alphas[open_rows][:, None]
        i = np.arange(start, start + width, dtype=np.float64)[None, :]
        j = a - i
        log_comb = _log_binomials(tuple(alphas[open_rows]), start, start + width)
        s0 = (
            log_comb
            + i * log_q
            + j * log_1mq
            + (i * i - i) / two_var
            + special.log_ndtr((z0 - i) / sigma)
        )
        s1 = (
            log_comb
            + j * log_q
            + i * log_1mq
            + (j * j - j) / two_var
            + special.log_ndtr((j - z0) / sigma)
        )
        magnitude = np.logaddexp(s0, s1)
        past_sign_change = i - np.floor(a) - 1.0
        negative = (past_sign_change > 0) & (np.mod(past_sign_change, 2.0) == 1.0)
        log_pos[open_rows] = np.logaddexp(
            log_pos[open_rows], _logsumexp(np.where(negative, -np.inf, magnitude))
        )
        log_neg[open_rows] = np.logaddexp(
            log_neg[open_rows], _logsumexp(np.where(negative, magnitude, -np.inf))
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            log_partial = log_pos[open_rows] + np.log1p(
                -np.exp(log_neg[open_rows] - log_pos[open_rows])
            )
        # The alternating-series bound needs falling magnitudes over the whole tail;
        # we require them over the sign-alternating part of this chunk.
        falling = np.all(
            np.where(past_sign_change[:, 1:] > 0, np.diff(magnitude, axis=1) <= 0, True), axis=1
        )
        last = magnitude[:, -1]
        done = (past_sign_change[:, -1] > 1) & falling & (last < log_partial - _SERIES_TAIL_LOG)
        done &= np.isfinite(log_partial)
        if np.any(done):
            rows = open_rows[done]
            # partial + |t_m| + rounding of the subtraction (a few ulps of P + N).
            slack = np.logaddexp(
                last[done], np.logaddexp(log_pos[rows], log_neg[rows]) + math.log(16 * _ULP)
            )
            result[rows] = np.logaddexp(log_partial[done], slack)
        open_rows = open_rows[~done]
        start += width
        width *= 2
    return result
