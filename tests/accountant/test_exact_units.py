"""Fixed-point curve units: rounding is always up, sums are exact and order-free.

The reference is exact rational arithmetic (fractions.Fraction), not the module itself.
"""

from __future__ import annotations

import math
import random
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accountant import exact, mechanisms

UNIT = Fraction(1, 1 << exact.SCALE_BITS)

non_negative_floats = st.one_of(
    st.floats(0.0, 1e300),
    st.floats(0.0, 1e-300),
    st.floats(0.0, 10.0),
    st.sampled_from([0.0, 5e-324, 2.0**-60, 2.0**-61, 1.0, sys.float_info.max, math.inf]),
)
curves = st.lists(non_negative_floats, min_size=1, max_size=12)

PROPERTY = settings(max_examples=100, deadline=None)


def ceil_units(x: float) -> int:
    return math.ceil(Fraction(x) / UNIT)


@PROPERTY
@given(curve=curves)
def test_to_units_rounds_up_to_the_next_unit(curve: list[float]) -> None:
    units = exact.to_units(curve)
    for x, unit in zip(curve, units, strict=True):
        if math.isinf(x):
            assert unit == exact.INFINITE
        else:
            assert unit == ceil_units(x)


@PROPERTY
@given(curve=curves)
def test_round_trip_never_lowers_a_value(curve: list[float]) -> None:
    back = exact.to_curve(exact.to_units(curve))
    for x, y in zip(curve, back.tolist(), strict=True):
        assert y >= x
        if math.isfinite(x):
            # …and is the smallest double at or above the unit it was stored as.
            stored = ceil_units(x) * UNIT
            assert Fraction(y) >= stored
            assert Fraction(math.nextafter(y, -math.inf)) < stored or y == 0.0


@PROPERTY
@given(
    parts=st.lists(curves.filter(lambda c: len(c) == 4), min_size=1, max_size=8), seed=st.integers()
)
def test_sums_are_exact_and_independent_of_order(parts: list[list[float]], seed: int) -> None:
    unit_parts = [exact.to_units(part) for part in parts]
    total = [0, 0, 0, 0]
    for part in unit_parts:
        total = exact.add(total, part)
    shuffled = unit_parts[:]
    random.Random(seed).shuffle(shuffled)
    other = [0, 0, 0, 0]
    for part in shuffled:
        other = exact.add(other, part)
    assert other == total
    # Removing every part again, in yet another order, returns exactly to zero.
    for part in reversed(shuffled):
        total = exact.subtract(total, part)
    assert total == [0, 0, 0, 0]


@PROPERTY
@given(parts=st.lists(curves.filter(lambda c: len(c) == 3), min_size=1, max_size=6))
def test_total_converts_back_at_or_above_the_exact_sum(parts: list[list[float]]) -> None:
    total = [0, 0, 0]
    for part in parts:
        total = exact.add(total, exact.to_units(part))
    back = exact.to_curve(total)
    for index in range(3):
        column = [part[index] for part in parts]
        if any(math.isinf(x) for x in column):
            assert back[index] == math.inf
        else:
            exact_sum = sum((Fraction(x) for x in column), Fraction(0))
            assert back[index] == math.inf or Fraction(float(back[index])) >= exact_sum


def test_ledger_style_hold_and_release_leaves_no_residue() -> None:
    """Floats leave residue when a hold is added then removed; units do not."""
    epoch = mechanisms.SubsampledGaussian(0.01, 1.1, 100).rdp()
    release = mechanisms.Laplace(0.3).rdp()
    float_total = epoch + release
    float_total = float_total - epoch
    assert not np.array_equal(float_total, release)  # the very problem units solve
    units = exact.add(exact.to_units(epoch), exact.to_units(release))
    assert exact.subtract(units, exact.to_units(epoch)) == exact.to_units(release)


def test_totals_beyond_the_largest_double_are_infinite() -> None:
    """Regression: a finite total in (max double, 2^1024) raised OverflowError."""
    just_below = exact.add(exact.to_units([2.0**1023 - 2.0**970]), exact.to_units([2.0**1023]))
    assert exact.to_curve(just_below)[0] == math.inf
    largest = exact.to_units([sys.float_info.max])
    assert exact.to_curve(largest)[0] == sys.float_info.max
    assert exact.to_curve([largest[0] + 1])[0] == math.inf
    assert exact.to_curve(exact.add(largest, largest))[0] == math.inf


def test_infinite_stays_infinite_through_finite_removals() -> None:
    total = exact.add(exact.to_units([math.inf, 1.0]), exact.to_units([3.0, 2.0]))
    total = exact.subtract(total, exact.to_units([3.0, 2.0]))
    assert exact.to_curve(total).tolist() == [math.inf, 1.0]


def test_removing_more_than_was_added_is_refused() -> None:
    with pytest.raises(ValueError, match="subtracting more than was added"):
        exact.subtract(exact.to_units([1.0, 1.0]), exact.to_units([0.5, 1.5]))
    with pytest.raises(ValueError, match="different grids"):
        exact.add([1, 2], [1])


@PROPERTY
@given(st.integers(min_value=0, max_value=1 << 1100), st.integers(min_value=-2, max_value=2))
def test_to_curve_is_the_smallest_float_at_or_above_the_exact_value(unit: int, nudge: int) -> None:
    """Each unit converts to the least double ≥ unit·2^-60 (+inf above the largest double), on
    both sides of where the conversion switches from float() to a division (2^1000 units)."""
    for value_units in {max(0, unit + nudge), max(0, (1 << 1000) + nudge)}:
        exact_value = Fraction(value_units, 1 << exact.SCALE_BITS)
        value = float(exact.to_curve([value_units])[0])
        if value == math.inf:
            assert exact_value > Fraction(sys.float_info.max)
            continue
        assert Fraction(value) >= exact_value
        below = math.nextafter(value, -math.inf)
        assert below < 0 or Fraction(below) < exact_value
