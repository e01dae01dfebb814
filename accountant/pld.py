"""PLD ε of one DP-SGD plan on its own ("this run alone"): shown beside the RDP ε, never a filter.

The privacy loss distribution (PLD) of `steps` Poisson-subsampled Gaussian steps gives the
tightest (ε, δ) of a plan fixed in advance (Meiser & Mohammadi 2018; Koskela, Jälkö &
Honkela 2020). It is not a valid privacy filter under adaptive composition (DESIGN §3), so
the ledger only shows it; the cap is enforced by the RDP filter.

Method (docs/accounting.md, "PLD for one plan"):
1. For each direction of the add/remove pair, the hockey-stick curve δ(ε) of one step in
   closed form (normal CDFs), sampled on the grid ε_i = i·h.
2. "Connect the dots" (Doroshenko et al. 2022, Sec. 4): the discrete PLD whose δ(ε) is the
   chord of the true curve between grid points, in e^ε. The true curve is convex in e^ε,
   so the chords lie above it everywhere: the discrete pair dominates the true one
   (Blackwell), and domination survives composition.
3. `steps`-fold self-composition by one FFT power on a window whose outside holds at most
   τ of the mass by a Chernoff bound on the discrete PLD; τ is added to δ (pessimistic for
   everything the circular wrap-around moves).
4. The smallest ε with δ(ε) ≤ δ on the composed discrete PLD, solved exactly between grid
   points; the worse of the two directions.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import fft, special

from accountant import _checks
from accountant._checks import FloatArray

__all__ = ["DEFAULT_DISCRETISATION", "MAX_POINTS", "MIN_DELTA", "dp_sgd_epsilon"]

# The grid step of the privacy loss, in nats: dp_accounting's default
# value_discretization_interval, at which our ε is within ~1e-4 of the limit h → 0.
DEFAULT_DISCRETISATION = 1e-4
_MIN_DISCRETISATION = 1e-6
_MAX_DISCRETISATION = 0.1
# The largest grid (one step's PLD or the composed window) we compute on: 2^21 points cost
# ~1 s here (the Chernoff bounds dominate). A wider plan needs a coarser discretisation.
MAX_POINTS = 1 << 21
# The FFT's rounding noise is ~1e-17 absolute per grid point; summed over a window of up to
# 10^5–10^6 points it stays below 1e-11, which must be negligible against δ.
MIN_DELTA = 1e-10
# The k-th power of the DFT loses ~k·2^-52 relative precision: 10^7 steps keep it below 2e-9.
_MAX_STEPS = 10**7
# Mass left out by truncation is added to δ: at most this fraction of δ in all (one step's
# tails) plus the same again for each tail of the composed window.
_TAIL_FRACTION = 1e-7
# Chernoff exponents tried for the window's bounds, in nats⁻¹ of privacy loss.
_CHERNOFF_T = np.geomspace(1e-2, 1e3, 11)
_REFINE = 10 ** (5 / 20)  # ± half a step of the coarse grid
_REFINE_POINTS = 7


def dp_sgd_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    *,
    discretisation: float = DEFAULT_DISCRETISATION,
) -> float:
    """PLD ε at δ of `steps` Poisson-subsampled Gaussian steps alone: an upper bound, not a filter.

    Add/remove-one neighbours, both directions (the worse is returned, as dp_accounting
    does). Pessimistic throughout: the result is never below the true ε of the plan (up to
    float rounding, ~1e-12 in δ); it exceeds it by the discretisation error, second order
    in h: ~1e-4 at the default `discretisation` of 1e-4 nats for the MNIST plan. Pure and
    memoised on its (hashable) arguments; 0.1–0.4 s a plan when not memoised (docs/
    benchmarks.md). Raises ValueError for arguments it cannot compute accurately.
    """
    q = _checks.sample_rate("sample_rate", sample_rate)
    sigma = _checks.positive("noise_multiplier", noise_multiplier)
    k = _checks.count("steps", steps, maximum=_MAX_STEPS)
    d = _checks.open_probability("delta", delta)
    if d < MIN_DELTA:
        raise ValueError(f"delta must be at least {MIN_DELTA:g} for the PLD, got {delta!r}")
    h = _checks.positive("discretisation", discretisation, maximum=_MAX_DISCRETISATION)
    if h < _MIN_DISCRETISATION:
        raise ValueError(
            f"discretisation must be at least {_MIN_DISCRETISATION:g}, got {discretisation!r}"
        )
    return _plan_epsilon(q, sigma, k, d, h)


@functools.lru_cache(maxsize=256)
def _plan_epsilon(q: float, sigma: float, k: int, delta: float, h: float) -> float:
    """The validated computation, memoised: a service asks again for every plan of one shape."""
    return max(_direction_epsilon(q, sigma, k, delta, h, present) for present in (True, False))


def _loss_with_record(x: float, q: float, sigma: float) -> float:
    """log of the density ratio (with the record)/(without) at output x (one step, σ-scaled)."""
    without = math.log1p(-q) if q < 1.0 else -math.inf  # q = 1: the plain Gaussian
    return float(np.logaddexp(without, math.log(q) + (2.0 * x - 1.0) / (2.0 * sigma**2)))


def _hockey_stick(eps: FloatArray, q: float, sigma: float, present: bool) -> FloatArray:
    """δ(ε) of one step: H_{e^ε}(P‖Q), P the output with the record if `present`, else without.

    With the record the output is A = (1-q)N(0,σ²) + qN(1,σ²), without it B = N(0,σ²). The
    set where one density exceeds e^ε times the other is a half-line {x > x*} or {x < x*},
    so H = P(set) - e^ε Q(set) in normal CDFs (Balle & Wang 2018, Thm. 8, for q = 1).
    """
    out = np.zeros_like(eps)
    log_q = math.log(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        if present:
            # A > e^ε B  ⟺  q·e^{(2x-1)/(2σ²)} > e^ε - (1-q)  ⟺  x > x*.
            excess = np.expm1(eps) + q
            live = excess > 0.0
            x = sigma**2 * (np.log(excess[live]) - log_q) + 0.5
            out[live] = q * special.ndtr((1.0 - x) / sigma) - excess[live] * special.ndtr(
                -x / sigma
            )
            out[~live] = -np.expm1(eps[~live])  # the whole line: 1 - e^ε
        else:
            # B > e^ε A  ⟺  q·e^{(2x-1)/(2σ²)} < e^-ε - (1-q)  ⟺  x < x*; empty if ≤ 0.
            room = np.expm1(-eps) + q
            live = room > 0.0
            x = sigma**2 * (np.log(room[live]) - log_q) + 0.5
            # 1 - e^ε(1-q) = e^ε·room, so H = e^ε [room·Φ(x*/σ) - q·Φ((x*-1)/σ)].
            out[live] = np.exp(eps[live]) * (
                room[live] * special.ndtr(x / sigma) - q * special.ndtr((x - 1.0) / sigma)
            )
    # Rounding can leave a hair below 0 where H is ~1e-300; δ is never negative.
    return np.maximum(out, 0.0)


def _one_step(
    q: float, sigma: float, h: float, tail: float, present: bool
) -> tuple[int, FloatArray, float]:
    """(index of the first grid point, masses on ε_i = i·h, mass at +∞) of one step's PLD.

    Connect the dots (Doroshenko et al. 2022, Sec. 4): with γ = e^ε the hockey-stick curve
    H(γ) is convex and non-increasing, H(0) = 1. The piecewise-linear f through (0, 1) and
    (γ_i, H(γ_i)), flat after the last point, is ≥ H everywhere, and it is the hockey-stick
    curve of the discrete PLD whose Q-mass at γ_i is the slope's increase there (P-mass
    γ_i times that) and whose mass at +∞ is H at the last point.
    """
    z = -float(special.ndtri(tail))  # Φ̄(z) = tail
    if present:
        # P = A. A(X > 1 + σz) ≤ Φ̄(z) and A(X < -σz) ≤ Φ̄(z); the loss increases with x.
        low, high = (
            _loss_with_record(-sigma * z, q, sigma),
            _loss_with_record(1 + sigma * z, q, sigma),
        )
    else:
        # P = B. The loss -L(x) decreases with x: B(X > σz) = B(X < -σz) = Φ̄(z).
        low, high = (
            -_loss_with_record(sigma * z, q, sigma),
            -_loss_with_record(-sigma * z, q, sigma),
        )
    first, last = math.floor(low / h), math.ceil(high / h)
    if last - first + 1 > MAX_POINTS:
        raise ValueError(
            f"noise_multiplier={sigma:g} is too small for discretisation={h:g}: one step's "
            f"privacy loss spans {last - first + 1} grid points (at most {MAX_POINTS})"
        )
    last = max(last, first + 1)
    eps = np.arange(first, last + 1, dtype=np.float64) * h
    curve = _hockey_stick(eps, q, sigma, present)
    gamma = np.exp(eps)
    slopes = np.empty(eps.size + 1)
    slopes[0] = (curve[0] - 1.0) / gamma[0]  # the chord from (0, 1)
    slopes[1:-1] = np.diff(curve) / (gamma[:-1] * math.expm1(h))
    slopes[-1] = 0.0  # flat after the last point: its height is the mass at +∞
    # Convexity makes every increase ≥ 0; a negative one is rounding, and zeroing it only
    # adds mass, which can only raise δ.
    q_mass = np.maximum(np.diff(slopes), 0.0)
    return first, q_mass * gamma, float(curve[-1])


def _direction_epsilon(
    q: float, sigma: float, k: int, delta: float, h: float, present: bool
) -> float:
    """ε at δ of k steps in one direction of the add/remove pair."""
    budget = delta * _TAIL_FRACTION
    first, probs, infinity = _one_step(q, sigma, h, budget / k, present)
    finite = float(probs.sum())
    # k-fold: finite mass finite^k; the rest of total^k sits at +∞ (stable for tiny mass).
    infinity_k = finite**k * math.expm1(k * math.log1p(infinity / finite))

    # Refuse a plan too wide to compute before the costly part: its central limit spread is
    # a lower bound, in practice, on the Chernoff window below.
    index = np.arange(probs.size, dtype=np.float64)
    mean = float(probs @ index) / finite
    spread = math.sqrt(max(float(probs @ (index - mean) ** 2) / finite, 0.0) * k)
    _check_size(int(2.0 * math.sqrt(2.0 * math.log(1.0 / budget)) * spread), h)
    low, high = _window(probs, k, budget, h)
    size = high - low + 1
    _check_size(size, h)
    n_fft = fft.next_fast_len(size, real=True)
    # Folding the input mod n_fft is the same as folding the output: the circular power
    # puts every sum R at R mod n_fft, the window's inside exactly, the outside on top of it.
    folded = np.bincount(np.arange(probs.size) % n_fft, weights=probs, minlength=n_fft)
    spectrum = fft.rfft(folded, n_fft)
    composed = fft.irfft(spectrum**k, n_fft)
    window = np.maximum(np.roll(composed, -(low % n_fft))[:size], 0.0)
    # Losses of the window's points: index k·first + low + j, in units of h.
    base = k * first + low
    # Outside the window: at most `budget` on each side (Chernoff), counted as δ in full.
    extra = infinity_k + 2.0 * budget
    return _epsilon_for_delta(window, base, h, extra, delta)


def _check_size(size: int, h: float) -> None:
    """ValueError if the composed PLD needs more than MAX_POINTS grid points."""
    if size > MAX_POINTS:
        raise ValueError(
            f"the plan's privacy loss spans {size} grid points at discretisation={h:g} "
            f"(at most {MAX_POINTS}): use a coarser discretisation or more noise"
        )


def _window(probs: FloatArray, k: int, budget: float, h: float) -> tuple[int, int]:
    """[low, high] (grid units above k·first) holding all but `budget` of each tail of k steps.

    Chernoff: for the k-fold sum S of the one-step discrete PLD (a measure of mass ≤ 1),
    μ(S ≥ high) ≤ M(t)^k e^{-t·high} and μ(S ≤ low) ≤ M(-t)^k e^{t·low} for every t > 0,
    M the moment-generating function over relative indices. Any t gives a valid bound; a
    coarse grid and one refinement around its best find a tight one.
    """
    index = np.arange(probs.size, dtype=np.float64)
    live = probs > 0.0
    index, log_p = index[live], np.log(probs[live])
    log_budget = math.log(budget)

    def bounds(t: FloatArray, sign: float) -> FloatArray:
        """For each t: the bound on S (above if sign > 0, below if < 0) leaving `budget` out."""
        exponent = log_p[None, :] + sign * t[:, None] * index[None, :]
        peak = exponent.max(axis=1)
        log_m: FloatArray = peak + np.log(np.exp(exponent - peak[:, None]).sum(axis=1))
        return sign * (k * log_m - log_budget) / t

    edges = []
    for sign, pick in ((1.0, np.argmin), (-1.0, np.argmax)):
        t = _CHERNOFF_T * h  # per grid unit
        best = t[int(pick(bounds(t, sign)))]
        t = np.concatenate([t, np.geomspace(best / _REFINE, best * _REFINE, _REFINE_POINTS)])
        found = bounds(t, sign)
        edges.append(float(found[int(pick(found))]))
    high, low = edges
    top = k * (probs.size - 1)
    return max(0, math.floor(low)), min(top, math.ceil(high))


def _epsilon_for_delta(probs: FloatArray, base: int, h: float, extra: float, delta: float) -> float:
    """Smallest ε ≥ 0 with extra + Σ_{l > ε} p(l)(1 - e^{ε-l}) ≤ δ, losses l_j = (base + j)·h."""
    losses = (base + np.arange(probs.size)) * h

    def delta_at(j: int) -> float:
        """δ at ε = losses[j] (the masses above the j-th point)."""
        return extra + float(np.sum(probs[j + 1 :] * -np.expm1(losses[j] - losses[j + 1 :])))

    above_zero = losses > 0.0
    delta_zero = extra + float(np.sum(probs[above_zero] * -np.expm1(-losses[above_zero])))
    if delta_zero <= delta:
        return 0.0
    if delta_at(probs.size - 1) > delta:
        raise ValueError(
            f"delta={delta:g} is below the mass this plan's PLD puts at +∞ or outside its window"
        )
    # Bisection for the first grid point at or above 0 where δ(l_j) ≤ δ.
    lo = int(np.searchsorted(losses, 0.0, side="right")) - 1  # δ(l_lo) > δ (or l_lo < 0)
    hi = probs.size - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if delta_at(mid) <= delta:
            hi = mid
        else:
            lo = mid
    # On (l_{hi-1}, l_hi], δ(ε) = C - e^{ε - l_hi}·D exactly; solve for ε.
    tail = probs[hi:]
    c = extra + float(tail.sum())
    d = float(np.sum(tail * np.exp(losses[hi] - losses[hi:])))
    floor = max(0.0, float(losses[hi - 1])) if hi >= 1 else 0.0
    if d <= 0.0 or c - delta <= 0.0:
        return floor
    epsilon = float(losses[hi]) + math.log((c - delta) / d)
    return min(max(epsilon, floor), float(losses[hi]))
