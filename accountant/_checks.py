"""Argument validation shared by the accountant's public functions.

Every check raises ValueError naming the argument, before any work is done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Beyond these the numbers stop meaning anything for a privacy budget and the
# arithmetic stops being trustworthy; refuse rather than guess.
MAX_STEPS = 10**12
MAX_ORDER = 10_000.0
MAX_ORDERS = 1_000
# The smallest δ and sample rate taken: below it the arithmetic leaves the normal float range
# (δ / |orders| underflows to 0, 1 / sample_rate overflows). No real budget is anywhere near it.
MIN_PROBABILITY = 1e-300


def finite_real(name: str, value: object) -> float:
    """`value` as a float, or ValueError if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result


def positive(name: str, value: object, *, maximum: float = math.inf) -> float:
    """A finite real in (0, maximum]."""
    result = finite_real(name, value)
    if not 0.0 < result <= maximum:
        bound = "" if math.isinf(maximum) else f" and at most {maximum:g}"
        raise ValueError(f"{name} must be > 0{bound}, got {value!r}")
    return result


def non_negative(name: str, value: object) -> float:
    """A finite real >= 0."""
    result = finite_real(name, value)
    if result < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return result


def sample_rate(name: str, value: object) -> float:
    """A Poisson sampling probability in [MIN_PROBABILITY, 1]."""
    result = finite_real(name, value)
    if not 0.0 < result <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    if result < MIN_PROBABILITY:
        raise ValueError(f"{name} must be at least {MIN_PROBABILITY:g}, got {value!r}")
    return result


def open_probability(name: str, value: object) -> float:
    """A probability in the open interval (0, 1), such as δ, and at least MIN_PROBABILITY."""
    result = finite_real(name, value)
    if not 0.0 < result < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if result < MIN_PROBABILITY:
        raise ValueError(f"{name} must be at least {MIN_PROBABILITY:g}, got {value!r}")
    return result


def count(name: str, value: object, *, maximum: int = MAX_STEPS) -> int:
    """An integer in [1, maximum]; integral floats such as 10.0 are accepted."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, Integral):
        result = int(value)
    elif isinstance(value, Real) and math.isfinite(float(value)) and float(value).is_integer():
        result = int(float(value))
    else:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 1 <= result <= maximum:
        raise ValueError(f"{name} must be between 1 and {maximum}, got {value!r}")
    return result


def orders(value: Sequence[float] | npt.ArrayLike) -> FloatArray:
    """A 1-D grid of distinct Rényi orders, each in (1, MAX_ORDER]."""
    try:
        grid = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"orders must be a sequence of real numbers: {exc}") from None
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError("orders must be a non-empty 1-D sequence")
    if grid.size > MAX_ORDERS:
        raise ValueError(f"orders must hold at most {MAX_ORDERS} orders, got {grid.size}")
    if not np.all(np.isfinite(grid)) or np.any(grid <= 1.0) or np.any(grid > MAX_ORDER):
        raise ValueError(f"orders must be finite and in (1, {MAX_ORDER:g}]")
    if np.unique(grid).size != grid.size:
        raise ValueError("orders must be distinct")
    return grid


def rdp_curve(value: npt.ArrayLike, grid: FloatArray) -> FloatArray:
    """An RDP curve matching `grid`: no NaN, no negative value (inf is allowed)."""
    try:
        curve = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rdp must be a sequence of real numbers: {exc}") from None
    if curve.shape != grid.shape:
        raise ValueError(f"rdp must have one value per order: {curve.shape} vs {grid.shape}")
    if np.any(np.isnan(curve)) or np.any(curve < 0.0):
        raise ValueError("rdp must be >= 0 at every order (no NaN)")
    return curve
