"""Noisy argmax (GNMax) and batched charges through HTTP, on SQLite and PostgreSQL: the labels
follow the discrete Gaussian's law, only labels leave the service, a batch of K costs exactly K
single queries, a batch that does not fit is refused whole, bad votes change nothing."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from service.storage.database import Database
from service.storage.models import IdempotencyRecord, LedgerEntry
from tests.service.conftest import Api, cached_budget

RELEASES = "/v1/datasets/{}/releases"


def _post(api: Api, dataset: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    response = api.post(RELEASES.format(dataset), body, **kwargs)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _argmax(votes: list[list[Any]], **noise: Any) -> dict[str, Any]:
    """A noisy_argmax body (`votes` may be malformed on purpose)."""
    return {"mechanism": "noisy_argmax", "teachers": 250, "votes": votes, **noise}


def _state(api: Api, dataset: str) -> tuple[int, float]:
    body = api.get(f"/v1/datasets/{dataset}").json()
    return body["ledger_seq"], body["epsilon_spent"]


def _p_difference_at_least(variance: Fraction, d: int) -> float:
    """P[Z₁ − Z₂ ≥ d] for independent discrete Gaussians of parameter σ² (exact pmf, 30σ)."""
    reach = int(30 * math.sqrt(variance)) + 1
    z = np.arange(-reach, reach + 1)
    pmf = np.exp(-(z.astype(float) ** 2) / (2 * float(variance)))
    pmf /= pmf.sum()
    cdf = np.cumsum(pmf)  # cdf[i] = P[Z ≤ z[i]]
    # Σ_z P[Z₁ = z] P[Z₂ ≤ z − d]
    index = np.clip(np.arange(z.size) - d, -1, z.size - 1)
    below = np.where(index >= 0, cdf[np.maximum(index, 0)], 0.0)
    return float(np.sum(pmf * below))


def test_label_frequencies_follow_the_discrete_gaussian_on_the_counts(api: Api) -> None:
    """Counts (c, c+d): label 0 wins iff Z₀ − Z₁ ≥ d (a tie goes to the smaller label), so its
    frequency must be the exact P[Z₁ − Z₂ ≥ d] of the discrete Gaussian of the answered σ²."""
    api.create_dataset("d", epsilon_cap=10_000.0)
    sigma, per_case, requests = 10.0, 5_000, 20
    gaps = (0, 5)
    votes = [[100, 100 + d] for d in gaps for _ in range(per_case)]
    zeros = dict.fromkeys(gaps, 0)
    variance = None
    for _ in range(requests):
        answer = _post(api, "d", _argmax(votes, noise_scale=sigma))
        numerator, denominator = answer["noise"]["exact_parameter"].split("/")
        variance = Fraction(int(numerator), int(denominator))
        labels = np.asarray(answer["labels"])
        for number, d in enumerate(gaps):
            zeros[d] += int(
                np.count_nonzero(labels[number * per_case : (number + 1) * per_case] == 0)
            )
    assert variance is not None and abs(float(variance) - sigma**2) <= sigma**2 * 2**-20
    n = per_case * requests
    for d in gaps:
        expected = _p_difference_at_least(variance, d)
        error = math.sqrt(expected * (1 - expected) / n)
        assert abs(zeros[d] / n - expected) < 4.5 * error, (d, zeros[d] / n, expected)
    # The tie rule is visible: with equal counts label 0 wins more than half the time (by
    # P[tie]/2 ≈ 1/(4σ√π) = 0.014 here, about nine standard errors).
    assert zeros[0] / n > 0.5 + 4.5 * math.sqrt(0.25 / n)


def _numbers(value: Any) -> list[float]:
    """Every number anywhere in a JSON value."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    return [n for item in value for n in _numbers(item)]


def test_only_labels_leave_the_service(api: Api, database: Database) -> None:
    """The answer, its stored idempotency record and the ledger entry carry the labels at most:
    no vote count and no noisy count (nothing within 30σ of any count)."""
    api.create_dataset("d", epsilon_cap=100.0)
    counts = [[71_993, 104_729, 0], [0, 15_485, 86_028]]  # teachers 200,000; no count near others
    body = {**_argmax(counts, noise_scale=2.0), "teachers": 200_000}
    key = {"Idempotency-Key": "argmax-1"}
    answer = _post(api, "d", body, headers=key)
    replay = api.post(RELEASES.format("d"), body, headers=key)
    assert replay.headers.get("Idempotent-Replayed") == "true" and replay.json() == answer
    assert answer["labels"] == [1, 2] and answer["count"] == 2
    assert answer["noised_values"] is None and answer["noised_batch"] is None
    with database.read() as session:
        record = session.execute(
            select(IdempotencyRecord).where(IdempotencyRecord.key == "argmax-1")
        ).scalar_one()
        entry = session.execute(
            select(LedgerEntry).where(LedgerEntry.seq == answer["ledger_seq"])
        ).scalar_one()
        stored = json.loads(record.response_body)
        entry_text = " ".join([entry.details, entry.mechanism or "", entry.units or ""])
        details = json.loads(entry.details)
    assert stored == answer
    assert details["count"] == 2 and details["classes"] == 3 and details["teachers"] == 200_000
    exported = api.get("/v1/datasets/d/ledger").json()["data"][-1]
    flat = [c for histogram in counts for c in histogram if c > 0]
    for where, value in (("answer", answer), ("record", stored), ("entry", exported)):
        near = [n for n in _numbers(value) for c in flat if abs(n - c) <= 60]
        assert near == [], (where, near)
    for count in flat:
        assert str(count) not in entry_text and str(count) not in record.response_body


def _twins(api: Api) -> None:
    api.create_dataset("batch", epsilon_cap=50.0)
    api.create_dataset("single", epsilon_cap=50.0)


@pytest.mark.parametrize(
    "one",
    [
        _argmax([[3, 5, 2]], epsilon=0.5, delta=1e-6),
        _argmax([[3, 5, 2]], noise_scale=7.0),
        {"mechanism": "laplace", "epsilon": 0.3},
        {"mechanism": "gaussian", "epsilon": 0.3, "delta": 1e-6},
        {"mechanism": "pure_dp", "epsilon": 0.1},
        {"mechanism": "gaussian", "noise_scale": 4.0, "values": [1.0, 2.5]},
        {"mechanism": "laplace", "epsilon": 0.2, "values": [1.0, 2.5]},
    ],
    ids=["argmax_eps", "argmax_sigma", "laplace", "gaussian", "pure_dp", "gauss_vals", "lap_vals"],
)
def test_a_batch_of_k_costs_exactly_k_single_queries(
    api: Api, database: Database, one: dict[str, Any]
) -> None:
    _twins(api)
    k = 7
    if one["mechanism"] == "noisy_argmax":
        batch = {**one, "votes": one["votes"] * k}
    elif "values" in one:
        batch = {**{f: v for f, v in one.items() if f != "values"}, "batch": [one["values"]] * k}
    else:
        batch = {**one, "count": k}
    charged = _post(api, "batch", batch)
    assert charged["count"] == k
    for _ in range(k):
        single = _post(api, "single", one)
        assert single["count"] == 1
    assert single["epsilon"] == charged["epsilon"]  # the per-query ε is the same
    batch_state, single_state = (
        api.get("/v1/datasets/batch").json(),
        api.get("/v1/datasets/single").json(),
    )
    assert batch_state["epsilon_spent"] == single_state["epsilon_spent"] > 0
    assert cached_budget(database, "batch").posted == cached_budget(database, "single").posted
    entry = api.get("/v1/datasets/batch/ledger").json()["data"][-1]
    assert entry["mechanism"]["steps"] == k and entry["details"]["count"] == k
    if "labels" in charged and charged["labels"] is not None:
        assert len(charged["labels"]) == k
    if "batch" in batch:
        assert len(charged["noised_batch"]) == k and charged["noised_values"] is None
    for dataset in ("batch", "single"):
        assert api.get(f"/v1/datasets/{dataset}/ledger/verify").json()["ok"] is True


@pytest.mark.parametrize(
    "batch",
    [
        _argmax([[10, 0]] * 400, noise_scale=10.0),
        {"mechanism": "laplace", "epsilon": 0.5, "count": 40},
        {"mechanism": "gaussian", "noise_scale": 7.0, "batch": [[1.0]] * 400},
    ],
    ids=["argmax", "count", "values"],
)
def test_a_batch_that_does_not_fit_is_refused_whole_and_charges_nothing(
    api: Api, database: Database, batch: dict[str, Any]
) -> None:
    api.create_dataset("d", epsilon_cap=10.0)
    before = _state(api, "d")
    posted = cached_budget(database, "d").posted
    response = api.post(RELEASES.format("d"), batch, headers={"Idempotency-Key": "too-big"})
    assert response.status_code == 409 and response.json()["code"] == "budget_exhausted"
    assert _state(api, "d") == before and cached_budget(database, "d").posted == posted
    # A fifth of it fits: a batch is decided as a whole, not cut to what fits.
    part = dict(batch)
    for field in ("votes", "batch"):
        if field in part:
            part[field] = part[field][: len(part[field]) // 5]
    if "count" in part:
        part["count"] = part["count"] // 5
    fitted = _post(api, "d", part, headers={"Idempotency-Key": "fits"})
    assert fitted["ledger_seq"] == before[0] + 1 and fitted["count"] == max(
        len(part.get("votes", part.get("batch", []))), part.get("count", 1)
    )


BAD_VOTES: list[tuple[str, dict[str, Any]]] = [
    ("negative_count", _argmax([[3, -1]], noise_scale=1.0)),
    ("float_count", _argmax([[3, 1.5]], noise_scale=1.0)),
    ("boolean_count", _argmax([[3, True]], noise_scale=1.0)),
    ("string_count", _argmax([[3, "1"]], noise_scale=1.0)),
    ("ragged", _argmax([[3, 1], [1, 1, 1]], noise_scale=1.0)),
    ("one_class", _argmax([[3]], noise_scale=1.0)),
    ("no_histograms", _argmax([], noise_scale=1.0)),
    ("over_teachers", _argmax([[200, 51]], noise_scale=1.0)),
    ("too_many_classes", _argmax([[0] * 1_001], noise_scale=1.0)),
    ("too_many_histograms", _argmax([[0, 0]] * 10_001, noise_scale=1.0)),
    ("too_many_counts", _argmax([[0] * 1_000] * 101, noise_scale=1.0)),
    ("no_noise", _argmax([[3, 1]])),
    ("both_noises", _argmax([[3, 1]], noise_scale=1.0, epsilon=1.0, delta=1e-6)),
    ("epsilon_without_delta", _argmax([[3, 1]], epsilon=1.0)),
    ("huge_noise", _argmax([[3, 1]], noise_scale=1e7)),
    ("tiny_noise", _argmax([[3, 1]], noise_scale=1e-300)),
    ("no_teachers", {**_argmax([[3, 1]], noise_scale=1.0), "teachers": None}),
    ("zero_teachers", {**_argmax([[0, 0]], noise_scale=1.0), "teachers": 0}),
    ("many_teachers", {**_argmax([[3, 1]], noise_scale=1.0), "teachers": 10**6 + 1}),
    ("sensitivity", {**_argmax([[3, 1]], noise_scale=1.0), "sensitivity": 1.0}),
    ("values", {**_argmax([[3, 1]], noise_scale=1.0), "values": [1.0]}),
    ("count", {**_argmax([[3, 1]], noise_scale=1.0), "count": 2}),
    ("votes_elsewhere", {"mechanism": "laplace", "epsilon": 1.0, "votes": [[1, 2]]}),
    ("count_with_values", {"mechanism": "laplace", "epsilon": 1.0, "values": [1.0], "count": 2}),
    (
        "values_and_batch",
        {"mechanism": "laplace", "epsilon": 1.0, "values": [1.0], "batch": [[1.0]]},
    ),
    ("ragged_batch", {"mechanism": "laplace", "epsilon": 1.0, "batch": [[1.0], [1.0, 2.0]]}),
    ("empty_batch", {"mechanism": "laplace", "epsilon": 1.0, "batch": []}),
    ("count_zero", {"mechanism": "laplace", "epsilon": 1.0, "count": 0}),
    ("count_huge", {"mechanism": "laplace", "epsilon": 1.0, "count": 10_001}),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_VOTES], ids=[n for n, _ in BAD_VOTES])
def test_malformed_votes_and_batches_get_422_and_change_nothing(
    api: Api, database: Database, body: dict[str, Any]
) -> None:
    api.create_dataset("d", epsilon_cap=10.0)
    before = _state(api, "d")
    response = api.post(RELEASES.format("d"), body, headers={"Idempotency-Key": "bad"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "validation_error"
    assert _state(api, "d") == before
    with database.read() as session:
        assert session.get(IdempotencyRecord, ("bootstrap", "bad")) is None


def test_a_dry_run_answers_no_labels_and_charges_nothing(api: Api) -> None:
    api.create_dataset("d", epsilon_cap=10.0)
    before = _state(api, "d")
    response = api.post(
        RELEASES.format("d") + "?dry_run=true", _argmax([[3, 5]] * 4, epsilon=0.5, delta=1e-6)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["admitted"] is True and body["labels"] is None and body["count"] == 4
    assert body["dataset"]["epsilon_spent"] > before[1]  # what the real call would leave
    assert _state(api, "d") == before
