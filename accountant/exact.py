"""Exact arithmetic on RDP curves, for a ledger that adds and removes them.

Floating-point sums are not associative: adding a hold's curve and later
subtracting it can leave a residue (even a tiny negative one), and a replay in
another order need not reproduce a cache bit for bit. The ledger therefore
stores curves as integers in units of 2^-60 nats per order. Every mechanism's
curve is rounded **up** to a whole unit (so never below the float bound), sums
and differences of integers are exact and order-free, and converting back
rounds up again. +inf (an order whose value is unbounded) is a sentinel far
above any sum of finite values; any total at or above it converts back to
+inf.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from accountant._checks import FloatArray

__all__ = ["INFINITE", "SCALE_BITS", "add", "subtract", "to_curve", "to_units"]

SCALE_BITS = 60
_SCALE = 1 << SCALE_BITS
# Far above any finite curve (finite RDP values are < 2^1024 · 2^60) even summed 2^64 times.
INFINITE = 1 << 1200

# The largest double, in units. Anything above it has no finite float at or above
# it (and `unit / _SCALE` would raise OverflowError just below 2^1024): +inf.
_LARGEST_FINITE = int(sys.float_info.max) << SCALE_BITS

Units = list[int]
# Units below this convert with float() (far below the largest double); one unit in floats.
_FLOAT_SAFE = 1 << 1000
_STEP = math.ldexp(1.0, -SCALE_BITS)


def to_units(curve: npt.ArrayLike) -> Units:
    """A non-negative curve as integer units of 2^-60, each rounded up; +inf → INFINITE."""
    values = np.asarray(curve, dtype=np.float64)
    if values.ndim != 1 or np.any(np.isnan(values)) or np.any(values < 0.0):
        raise ValueError("curve must be 1-D, non-negative and free of NaN")
    return [INFINITE if math.isinf(x) else _ceil_units(x) for x in values.tolist()]


def _ceil_units(x: float) -> int:
    """ceil(x · 2^60) computed exactly from the float's mantissa and exponent."""
    mantissa, exponent = math.frexp(x)
    whole = int(mantissa * (1 << 53))  # exact: a double has a 53-bit mantissa
    shift = exponent - 53 + SCALE_BITS
    return whole << shift if shift >= 0 else -((-whole) >> -shift)


def to_curve(units: Sequence[int]) -> FloatArray:
    """Units back to floats, each rounded up (never below the exact value)."""
    out = np.empty(len(units), dtype=np.float64)
    for index, unit in enumerate(units):
        if unit < 0:
            raise ValueError("units must be non-negative")
        if unit < _FLOAT_SAFE:
            # float() rounds to nearest and int() of a float is exact: step up if it rounded
            # down. Scaling by 2^-60 is then exact (the result is a normal number).
            value = float(unit)
            out[index] = (value if int(value) >= unit else math.nextafter(value, math.inf)) * _STEP
        elif unit > _LARGEST_FINITE:
            out[index] = math.inf
        else:  # near the largest double: float(unit) may overflow where unit / 2^60 does not
            value = unit / _SCALE  # correctly rounded; step up if it rounded down
            out[index] = value if _ceil_units(value) >= unit else math.nextafter(value, math.inf)
    return out


def add(left: Sequence[int], right: Sequence[int]) -> Units:
    """Element-wise sum (exact)."""
    _same_length(left, right)
    return [a + b for a, b in zip(left, right, strict=True)]


def subtract(left: Sequence[int], right: Sequence[int]) -> Units:
    """Element-wise difference (exact); ValueError if any order would go negative."""
    _same_length(left, right)
    out = [a - b for a, b in zip(left, right, strict=True)]
    if any(value < 0 for value in out):
        raise ValueError("subtracting more than was added: the curves are inconsistent")
    return out


def _same_length(left: Sequence[int], right: Sequence[int]) -> None:
    if len(left) != len(right):
        raise ValueError(f"curves on different grids: {len(left)} vs {len(right)} orders")
