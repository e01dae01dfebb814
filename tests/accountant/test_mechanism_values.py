"""Mechanisms as stored values: their curves, their params round trip, their immutability."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest

from accountant import CALIBRATION_ORDERS, DEFAULT_ORDERS, mechanisms, rdp

CASES: list[tuple[mechanisms.Mechanism, np.ndarray]] = [
    (
        mechanisms.SubsampledGaussian(sample_rate=0.01, noise_multiplier=1.1, steps=600),
        rdp.subsampled_gaussian(0.01, 1.1, 600),
    ),
    (mechanisms.Gaussian(noise_multiplier=4.0, steps=3), 3 * DEFAULT_ORDERS / 32.0),
    (mechanisms.Laplace(scale=2.0, steps=5), rdp.laplace(2.0, 5)),
    (mechanisms.PureDP(epsilon=0.7, steps=2), rdp.pure_dp(0.7, 2)),
]


@pytest.mark.parametrize(("mechanism", "expected"), CASES)
def test_curve_on_the_default_and_other_grids(
    mechanism: mechanisms.Mechanism, expected: np.ndarray
) -> None:
    np.testing.assert_allclose(mechanism.rdp(), expected, rtol=1e-15)
    other = mechanism.rdp(CALIBRATION_ORDERS)
    assert other.shape == CALIBRATION_ORDERS.shape
    np.testing.assert_allclose(other[np.isin(CALIBRATION_ORDERS, DEFAULT_ORDERS)], expected)


@pytest.mark.parametrize(("mechanism", "expected"), CASES)
def test_params_round_trip_through_json(
    mechanism: mechanisms.Mechanism, expected: np.ndarray
) -> None:
    stored = json.loads(json.dumps(mechanism.params()))
    assert stored["kind"] == mechanism.kind
    rebuilt = mechanisms.from_params(stored)
    assert rebuilt == mechanism
    assert hash(rebuilt) == hash(mechanism)
    np.testing.assert_array_equal(rebuilt.rdp(), mechanism.rdp())


def test_params_are_normalised_on_construction() -> None:
    value = mechanisms.SubsampledGaussian(sample_rate=1, noise_multiplier=2, steps=10.0)  # type: ignore[arg-type]
    assert value.params() == {
        "kind": "subsampled_gaussian",
        "sample_rate": 1.0,
        "noise_multiplier": 2.0,
        "steps": 10,
    }
    assert isinstance(value.steps, int)


def test_mechanisms_are_immutable() -> None:
    value = mechanisms.Laplace(scale=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.scale = 0.001  # type: ignore[misc]
    assert value.steps == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kind": "exponential", "epsilon": 1.0}, "unknown mechanism kind"),
        ({"epsilon": 1.0}, "unknown mechanism kind"),
        ({"kind": "pure_dp"}, "bad parameters for pure_dp"),
        ({"kind": "laplace", "scale": 1.0, "sensitivity": 2.0}, "bad parameters for laplace"),
        ({"kind": "gaussian", "noise_multiplier": -1.0}, "noise_multiplier"),
        (
            {"kind": "subsampled_gaussian", "sample_rate": 2.0, "noise_multiplier": 1.0},
            "sample_rate",
        ),
        ({"kind": "pure_dp", "epsilon": 1.0, "steps": True}, "steps"),
    ],
)
def test_from_params_refuses_anything_unknown_or_invalid(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mechanisms.from_params(params)
