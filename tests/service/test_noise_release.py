"""Noise the service adds, seen through HTTP: the floating-point attack fails, the noise has
the declared distribution, and the charge is the mechanism that ran."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from scipy import stats

from tests.service.conftest import Api

DRAWS = 100_000
RELEASES = "/v1/datasets/d/releases"


def _noised(api: Api, values: list[float], **release: Any) -> dict[str, Any]:
    response = api.post(RELEASES, {**release, "values": values})
    assert response.status_code == 201, response.text
    return dict(response.json())


def _off_grid(outputs: np.ndarray) -> float:
    """P[|y| < 1/2 and y is not a multiple of 2^-53]: Mironov's event (Jin et al. 2022)."""
    small = outputs[np.abs(outputs) < 0.5]
    scaled = np.ldexp(small, 53)
    return float(np.count_nonzero(scaled != np.floor(scaled))) / outputs.size


def _lowest_bit(outputs: np.ndarray) -> Counter[int]:
    """The histogram of each output's lowest set bit (its 2-adic valuation): what the low bits
    of a float sum give away."""
    valuations: Counter[int] = Counter()
    for y in outputs.tolist():
        if y == 0.0:
            valuations[10_000] += 1
            continue
        mantissa, exponent = math.frexp(y)
        whole = int(math.ldexp(abs(mantissa), 53))
        valuations[exponent - 53 + (whole & -whole).bit_length() - 1] += 1
    return valuations


def _homogeneity_pvalue(left: Counter[int], right: Counter[int]) -> float:
    """Chi-square test that two histograms come from one distribution (sparse bins pooled)."""
    keys = sorted(set(left) | set(right))
    table = np.array([[left.get(k, 0), right.get(k, 0)] for k in keys], dtype=float)
    dense = table[table.sum(axis=1) >= 10]
    sparse = table[table.sum(axis=1) < 10].sum(axis=0, keepdims=True)
    table = np.vstack([dense, sparse]) if sparse.sum() > 0 else dense
    if table.shape[0] < 2:
        return 1.0
    return float(stats.chi2_contingency(table).pvalue)


def _distinguisher(zero: np.ndarray, one: np.ndarray) -> tuple[float, float, float]:
    """(advantage of the off-grid event, its standard error, lowest-bit homogeneity p-value)."""
    p0, p1 = _off_grid(zero), _off_grid(one)
    error = math.sqrt(p0 * (1 - p0) / zero.size + p1 * (1 - p1) / one.size)
    return abs(p0 - p1), error, _homogeneity_pvalue(_lowest_bit(zero), _lowest_bit(one))


def test_the_distinguisher_breaks_float_noise() -> None:
    """The same distinguisher against the float noise the service used to add: it wins."""
    generator = np.random.default_rng(12345)
    zero = 0.0 + generator.laplace(0.0, 1.0, DRAWS)
    one = 1.0 + generator.laplace(0.0, 1.0, DRAWS)
    advantage, error, homogeneity = _distinguisher(zero, one)
    assert advantage > 0.2 and advantage > 20 * error
    assert homogeneity < 1e-12
    gaussian_zero = 0.0 + generator.normal(0.0, 3.7306, DRAWS)
    gaussian_one = 1.0 + generator.normal(0.0, 3.7306, DRAWS)
    advantage, error, _ = _distinguisher(gaussian_zero, gaussian_one)
    assert advantage > 0.05 and advantage > 20 * error


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "release",
    [
        {"mechanism": "laplace", "epsilon": 1.0},
        {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-5},
    ],
    ids=["laplace", "gaussian"],
)
def test_the_floating_point_attack_fails_through_http(api: Api, release: dict[str, Any]) -> None:
    """100,000 noised copies of 0 and of 1: the distinguisher's advantage is within sampling
    error of 0, and the noise that comes back has the declared distribution."""
    api.create_dataset("d", 100.0)
    answer_zero = _noised(api, [0.0] * DRAWS, **release)
    answer_one = _noised(api, [1.0] * DRAWS, **release)
    zero = np.asarray(answer_zero["noised_values"])
    one = np.asarray(answer_one["noised_values"])
    assert zero.size == one.size == DRAWS

    advantage, error, homogeneity = _distinguisher(zero, one)
    assert advantage <= 4 * error + 1.0 / DRAWS
    assert homogeneity > 1e-4

    noise = answer_zero["noise"]
    assert noise == answer_one["noise"]  # the grid depends on the request, never on the values
    grid = noise["grid"]
    assert math.log2(grid).is_integer()
    assert np.all(np.ldexp(zero, -int(math.log2(grid))) % 1 == 0)  # every output on the grid
    scale = noise["noise_scale"]
    assert answer_zero["noise_scale"] == scale
    samples = np.concatenate([zero, one - 1.0])
    if release["mechanism"] == "laplace":
        assert noise["distribution"] == "discrete_laplace"
        assert scale >= 1.0  # b = Δ/ε, grown by the rounding's share only
        assert np.std(samples) == pytest.approx(math.sqrt(2) * scale, rel=0.02)
        reference = stats.laplace(scale=scale)
    else:
        assert noise["distribution"] == "discrete_gaussian"
        assert scale == pytest.approx(3.7306, rel=1e-3)  # Balle & Wang: (1, 1e-5) → 3.7306
        assert np.std(samples) == pytest.approx(scale, rel=0.015)
        reference = stats.norm(scale=scale)
    assert abs(float(np.mean(samples))) < 5 * scale / math.sqrt(samples.size)
    assert stats.kstest(samples, reference.cdf).pvalue > 1e-4


def _spent(api: Api) -> tuple[float, int]:
    body = api.get("/v1/datasets/d").json()
    return float(body["epsilon_spent"]), int(body["ledger_seq"])


def _last_entry(api: Api) -> dict[str, Any]:
    entries = api.get("/v1/datasets/d/ledger", params={"limit": 1000}).json()["data"]
    return dict(entries[-1])


def test_a_laplace_release_with_values_is_exactly_its_epsilon(api: Api) -> None:
    api.create_dataset("d", 10.0)
    answer = _noised(api, [1.0, 2.0, 3.0], mechanism="laplace", sensitivity=2.0, epsilon=0.1)
    assert answer["epsilon"] == 0.1
    noise = answer["noise"]
    grid = Fraction(noise["grid"])
    units = math.floor(2 / grid + Fraction(9, 2))  # rounded values' L1 bound: Δ/g + 3/2 each
    assert noise["sensitivity_after_rounding"] == float(units * grid)
    assert Fraction(noise["exact_parameter"]) == units * 10  # scale t = D/ε in grid steps
    # b = Δ_rounded / ε exactly; Δ_rounded exceeds Δ by 4.5 grid steps ≤ 2^-12 of Δ/3 each.
    assert Fraction(answer["noise_scale"]) >= units * grid * 10
    assert 20.0 <= answer["noise_scale"] <= 20.0 * (1 + 1.5 * 2**-12)
    entry = _last_entry(api)
    assert entry["mechanism"] == {"kind": "pure_dp", "epsilon": 0.1, "steps": 1}
    assert entry["details"]["noise"] == noise


def test_a_laplace_release_with_values_and_a_scale_charges_the_rounded_sensitivity(
    api: Api,
) -> None:
    api.create_dataset("d", 10.0)
    answer = _noised(api, [5.0] * 4, mechanism="laplace", sensitivity=3.0, noise_scale=4.0)
    grid = Fraction(answer["noise"]["grid"])
    exact = math.floor(3 / grid + 6) * grid / 4
    assert Fraction(answer["epsilon"]) >= exact > Fraction(3, 4)
    assert Fraction(repr(answer["epsilon"])) >= exact  # also as the decimal a pure sum reads
    assert answer["epsilon"] == pytest.approx(float(exact), rel=1e-15)
    assert _last_entry(api)["mechanism"]["kind"] == "pure_dp"


def test_a_gaussian_release_with_values_is_charged_at_the_rounded_sensitivity(api: Api) -> None:
    api.create_dataset("d", 10.0)
    answer = _noised(
        api, [1.0] * 10, mechanism="gaussian", sensitivity=3.0, epsilon=0.5, delta=1e-5
    )
    grid = answer["noise"]["grid"]
    rounded = answer["noise"]["sensitivity_after_rounding"]
    assert rounded >= 3.0 + 1.5 * grid * math.sqrt(10)
    assert rounded <= 3.0 * (1 + 2**-10)
    # Balle & Wang: (0.5, 1e-5) needs σ = 7.0318 per unit of sensitivity.
    assert answer["noise_scale"] == pytest.approx(7.0318 * rounded, rel=1e-4)
    mechanism = _last_entry(api)["mechanism"]
    assert mechanism["kind"] == "gaussian"
    assert mechanism["noise_multiplier"] == pytest.approx(7.0318, rel=1e-4)
    assert mechanism["noise_multiplier"] <= answer["noise_scale"] / rounded


def test_values_beyond_the_grid_are_refused_and_change_nothing(api: Api) -> None:
    api.create_dataset("d", 10.0)
    before = _spent(api)
    release = {"mechanism": "laplace", "epsilon": 1.0, "values": [1.0, 1e17]}
    response = api.post(RELEASES, release)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert "values[1]" in problem["detail"] and "grid" in problem["detail"]
    assert _spent(api) == before
    empty = api.post(RELEASES, {"mechanism": "laplace", "epsilon": 1.0, "values": []})
    assert empty.status_code == 422 and _spent(api) == before


def test_a_dry_run_with_values_shows_the_grid_and_no_values(api: Api) -> None:
    api.create_dataset("d", 10.0)
    release = {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-5, "values": [1.0, 2.0]}
    response = api.post(RELEASES, release, params={"dry_run": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["admitted"] is True
    assert body["noised_values"] is None
    assert body["noise"]["distribution"] == "discrete_gaussian"
    assert _spent(api) == (0.0, 1)
