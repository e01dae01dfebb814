"""Every public function refuses bad arguments with a ValueError that names the argument.

One table of valid calls; each case breaks exactly one argument of one call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from accountant import DEFAULT_ORDERS, Filter, calibrate, exact, mechanisms, rdp

ORDERS = [2.0, 4.0, 8.0]
CURVE = [0.1, 0.2, 0.4]

BAD: dict[str, list[Any]] = {
    "probability": [0.0, 5e-324, 1e-301, -0.1, 1.0000001, math.nan, math.inf, True, "0.5", None],
    "positive": [0.0, -1.0, math.nan, math.inf, -math.inf, True, None, "1", 1j],
    "non_negative": [-1.0, -1e-300, math.nan, math.inf, True, None],
    "delta": [0.0, 5e-324, 1e-301, 1.0, -1e-5, 1.5, math.nan, math.inf, True, None],
    "steps": [0, -1, 1.5, math.nan, math.inf, True, False, 10**13, "10", None],
    "orders": [
        [],
        [1.0],
        [0.5, 2.0],
        [2.0, 2.0],
        [2.0, math.nan],
        [2.0, math.inf],
        [[2.0, 3.0]],
        [2.0, 10_001.0],
        list(np.arange(2.0, 1003.0)),
        "abc",
        2.0,
    ],
    "curve": [[0.1, -0.2, 0.4], [0.1, math.nan, 0.4], [0.1, 0.2], [[0.1, 0.2, 0.4]], ["a", 0, 0]],
}

# name → (callable, valid keyword arguments, {argument: kind of argument}).
CALLS: dict[str, tuple[Callable[..., Any], dict[str, Any], dict[str, str]]] = {
    "rdp.subsampled_gaussian": (
        rdp.subsampled_gaussian,
        {"sample_rate": 0.01, "noise_multiplier": 1.0, "steps": 10, "orders": ORDERS},
        {
            "sample_rate": "probability",
            "noise_multiplier": "positive",
            "steps": "steps",
            "orders": "orders",
        },
    ),
    "rdp.gaussian": (
        rdp.gaussian,
        {"noise_multiplier": 1.0, "steps": 3, "orders": ORDERS},
        {"noise_multiplier": "positive", "steps": "steps", "orders": "orders"},
    ),
    "rdp.laplace": (
        rdp.laplace,
        {"scale": 1.0, "steps": 3, "orders": ORDERS},
        {"scale": "positive", "steps": "steps", "orders": "orders"},
    ),
    "rdp.pure_dp": (
        rdp.pure_dp,
        {"epsilon": 1.0, "steps": 3, "orders": ORDERS},
        {"epsilon": "positive", "steps": "steps", "orders": "orders"},
    ),
    "rdp.to_epsilon": (
        rdp.to_epsilon,
        {"rdp": CURVE, "delta": 1e-5, "orders": ORDERS},
        {"rdp": "curve", "delta": "delta", "orders": "orders"},
    ),
    "calibrate.dp_sgd_epsilon": (
        calibrate.dp_sgd_epsilon,
        {"noise_multiplier": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100},
        {
            "noise_multiplier": "positive",
            "delta": "delta",
            "sample_rate": "probability",
            "steps": "steps",
            "orders": "orders",
        },
    ),
    "calibrate.noise_multiplier": (
        calibrate.noise_multiplier,
        {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100},
        {
            "target_epsilon": "positive",
            "delta": "delta",
            "sample_rate": "probability",
            "steps": "steps",
            "orders": "orders",
        },
    ),
    "calibrate.gaussian_sigma": (
        calibrate.gaussian_sigma,
        {"epsilon": 1.0, "delta": 1e-5, "sensitivity": 1.0},
        {"epsilon": "positive", "delta": "delta", "sensitivity": "positive"},
    ),
    "calibrate.gaussian_epsilon": (
        calibrate.gaussian_epsilon,
        {"noise_scale": 4.0, "delta": 1e-5, "sensitivity": 1.0},
        {"noise_scale": "positive", "delta": "delta", "sensitivity": "positive"},
    ),
    "calibrate.laplace_scale": (
        calibrate.laplace_scale,
        {"epsilon": 1.0, "sensitivity": 1.0},
        {"epsilon": "positive", "sensitivity": "positive"},
    ),
    "Filter": (
        Filter,
        {"epsilon_cap": 1.0, "delta": 1e-5, "orders": ORDERS},
        {"epsilon_cap": "non_negative", "delta": "delta", "orders": "orders"},
    ),
    "Filter.admits": (
        lambda rdp: Filter(1.0, 1e-5, ORDERS).admits(rdp),
        {"rdp": CURVE},
        {"rdp": "curve"},
    ),
    "Filter.epsilon": (
        lambda rdp: Filter(1.0, 1e-5, ORDERS).epsilon(rdp),
        {"rdp": CURVE},
        {"rdp": "curve"},
    ),
    "mechanisms.SubsampledGaussian": (
        mechanisms.SubsampledGaussian,
        {"sample_rate": 0.01, "noise_multiplier": 1.0, "steps": 10},
        {"sample_rate": "probability", "noise_multiplier": "positive", "steps": "steps"},
    ),
    "mechanisms.Gaussian": (
        mechanisms.Gaussian,
        {"noise_multiplier": 1.0, "steps": 1},
        {"noise_multiplier": "positive", "steps": "steps"},
    ),
    "mechanisms.Laplace": (
        mechanisms.Laplace,
        {"scale": 1.0, "steps": 1},
        {"scale": "positive", "steps": "steps"},
    ),
    "mechanisms.PureDP": (
        mechanisms.PureDP,
        {"epsilon": 1.0, "steps": 1},
        {"epsilon": "positive", "steps": "steps"},
    ),
}


def cases() -> list[Any]:
    out = []
    for call_name, (_, _valid, kinds) in CALLS.items():
        for argument, kind in kinds.items():
            for index, value in enumerate(BAD[kind]):
                out.append(
                    pytest.param(call_name, argument, value, id=f"{call_name}-{argument}-{index}")
                )
    return out


@pytest.mark.parametrize("call_name", list(CALLS))
def test_the_unbroken_calls_work(call_name: str) -> None:
    function, valid, _ = CALLS[call_name]
    assert function(**valid) is not None


@pytest.mark.parametrize(("call_name", "argument", "value"), cases())
def test_bad_argument_is_refused_by_name(call_name: str, argument: str, value: Any) -> None:
    function, valid, _ = CALLS[call_name]
    with pytest.raises(ValueError, match=rf"\b{re.escape(argument)}\b"):
        function(**{**valid, argument: value})


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: exact.to_units([0.1, -0.1]), "curve"),
        (lambda: exact.to_units([0.1, math.nan]), "curve"),
        (lambda: exact.to_units([[0.1]]), "curve"),
        (lambda: exact.to_curve([1, -1]), "units"),
    ],
)
def test_exact_units_refuse_bad_input_by_name(call: Callable[[], Any], argument: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        call()


def test_curves_on_the_default_grid_must_have_one_value_per_order() -> None:
    with pytest.raises(ValueError, match="one value per order"):
        rdp.to_epsilon(np.zeros(DEFAULT_ORDERS.size - 1), 1e-5)


def test_integral_numbers_of_any_type_are_accepted_as_steps() -> None:
    expected = rdp.gaussian(1.0, 7)
    for steps in (7, 7.0, np.int64(7), np.float64(7.0)):
        np.testing.assert_array_equal(rdp.gaussian(1.0, steps), expected)  # type: ignore[arg-type]
