"""Shares fixed at the first admission (the first_admission profile, the default).

A dataset created without shares has none yet: its first admitted request fixes them, 19/20 of
δ on the order where a history of that request's shape reaching the cap converts best
(docs/accounting.md §3.1). What must hold, on SQLite and PostgreSQL:

- until then the dataset shows no weights, and refused requests and dry runs fix nothing;
- the admission that fixes them records them in its entry; the dataset shows them and the
  seq that fixed them; a cap change afterwards keeps them; verify replays them and finds any
  change behind the ledger's back;
- the heavy order is the one an independent computation of the conversion finds;
- admissions of one batch: the first decided fixes them, the rest are decided with them;
- a plan with fit_remaining on an empty dataset fills it with the σ non-adaptive RDP needs
  (within 1 %: issue 12's goal), for the run shapes the fixed-at-creation default misses.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants.utils import get_noise_multiplier

from accountant import DEFAULT_ORDERS
from accountant.orders import CALIBRATION_ORDERS
from service.storage.database import Database
from service.storage.models import Dataset
from tests.service.conftest import Api
from tests.service.test_combined_commits import (
    DEADLINE,
    Request,
    _assert_consistent,
    _pipeline,
    _post_together,
    lane_held,
)

DELTA = 1e-5
HEAVY = Fraction(19, 20)
GAUSSIAN: dict[str, Any] = {"mechanism": "gaussian", "epsilon": 0.3, "delta": 1e-6}
LAPLACE = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.1}
CIFAR_Q, CIFAR_STEPS, CIFAR_EPOCHS = 256 / 50000, 196, 30


def _rdp_reference(q: float, sigma: float, orders: list[float]) -> Any:
    """One Poisson-subsampled Gaussian step's RDP, as dp_accounting computes it."""
    # A private helper, but the function the accountant's own curve is tested against.
    compute = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian
    return np.asarray(compute(q, sigma, orders))


def _dataset(api: Api, dataset_id: str = "d") -> dict[str, Any]:
    response = api.get(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _entries(api: Api, dataset_id: str = "d") -> list[dict[str, Any]]:
    response = api.get(f"/v1/datasets/{dataset_id}/ledger", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def _verify(api: Api, dataset_id: str = "d") -> dict[str, Any]:
    return dict(api.get(f"/v1/datasets/{dataset_id}/ledger/verify").json())


def _unfixed(shares: dict[str, Any]) -> bool:
    return (
        shares["profile"] == "first_admission"
        and shares["weights"] == []
        and shares["fixed_at_seq"] is None
        and shares["orders"] == [float(a) for a in DEFAULT_ORDERS]
    )


def _offset(alpha: float, delta: float) -> float:
    """log1p(−1/α) − (log δ + log α)/(α − 1): Balle et al. 2020, Prop. 12."""
    return math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)


def _expected_order(
    cap: float, delta: float, plan: tuple[float, int] | None = None, sigma: float | None = None
) -> float:
    """The heavy order, computed here from its definition with dp_accounting's curves.

    A DP-SGD plan (q, all its steps) with its σ: repeats of it, k·curve, reach the cap; the
    largest k with k·curve(α) + offset ≤ cap is (cap − offset)/curve(α), maximal at the
    order returned. Without σ (a plan that fills the cap): the σ with which the plan reaches
    the cap at 19/20 of δ (bisection), and the order where it converts best. Without a plan:
    the Gaussian shape c·α. Offsets at 19/20 of δ; orders of CALIBRATION_ORDERS.
    """
    heavy_delta = float(Fraction(delta) * HEAVY)
    orders = [float(a) for a in CALIBRATION_ORDERS]
    offsets = [_offset(a, heavy_delta) for a in orders]

    def best_repeated(curve: list[float]) -> float:
        scale = [
            (cap - off) / c if cap > off and 0 < c < math.inf else -math.inf
            for c, off in zip(curve, offsets, strict=True)
        ]
        return orders[max(range(len(orders)), key=scale.__getitem__)]

    if plan is None:
        return best_repeated(orders)  # c·α
    q, steps = plan
    if sigma is not None:
        return best_repeated(list(steps * _rdp_reference(q, sigma, orders)))

    def converted(noise: float) -> list[float]:
        curve = steps * _rdp_reference(q, noise, orders)
        return [c + off for c, off in zip(curve, offsets, strict=True)]

    low, high = 0.05, 200.0  # ε is decreasing in σ: bisect on log σ for min ε = cap
    for _ in range(80):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if min(converted(middle)) > cap else (low, middle)
    values = converted(high)
    return orders[min(range(len(orders)), key=values.__getitem__)]


def _assert_fixed_for(shares: dict[str, Any], alpha: float, seq: int) -> None:
    """19/20 on α, the rest evenly over the other orders of DEFAULT_ORDERS; fixed by `seq`."""
    assert shares["profile"] == "first_admission" and shares["fixed_at_seq"] == seq
    assert shares["pure_sum"] is True
    grid = sorted({float(a) for a in DEFAULT_ORDERS} | {alpha})
    assert shares["orders"] == grid
    thin = (1 - HEAVY) / (len(grid) - 1)
    weights = [Fraction(w) for w in shares["weights"]]
    assert weights == [HEAVY if a == alpha else thin for a in grid]
    assert sum(weights) == 1


def test_a_new_dataset_fixes_its_shares_at_its_first_admission(
    api: Api, database: Database
) -> None:
    created = api.create_dataset("d", 3.0, DELTA)
    assert _unfixed(created["shares"]), created["shares"]
    assert created["epsilon_spent"] == 0.0 and created["epsilon_decided_by"] is None
    assert _entries(api)[0]["details"]["shares"] == created["shares"]
    assert _verify(api)["ok"] is True

    plan = {"sample_rate": CIFAR_Q, "steps_per_epoch": CIFAR_STEPS, "epochs": CIFAR_EPOCHS}
    plan = {**plan, "noise_multiplier": 0.95}
    dry = api.post("/v1/datasets/d/runs", plan, params={"dry_run": "true"})
    assert dry.status_code == 200 and dry.json()["admitted"] is True, dry.text
    assert _unfixed(_dataset(api)["shares"])  # a dry run fixes nothing

    run = api.post("/v1/datasets/d/runs", plan)
    assert run.status_code == 201, run.text
    alpha = _expected_order(3.0, DELTA, (CIFAR_Q, CIFAR_STEPS * CIFAR_EPOCHS), sigma=0.95)
    shares = run.json()["dataset"]["shares"]
    _assert_fixed_for(shares, alpha, seq=2)
    hold = _entries(api)[1]
    assert hold["kind"] == "hold" and hold["details"]["shares"] == shares
    assert [e for e in _entries(api) if "shares" in e["details"]][1:] == [hold]
    # The hold was charged on the fixed grid; its ε is decided by the heavy order.
    assert len(hold["units"]) == len(shares["orders"])
    decided = api.post(f"/v1/runs/{run.json()['id']}/epochs").json()["dataset"]
    assert decided["epsilon_decided_by"]["order"] == alpha
    assert decided["epsilon_decided_by"]["share"] == "19/20"

    # A cap change keeps them; verify replays them.
    changed = api.patch("/v1/datasets/d", {"epsilon_cap": 3.5}).json()
    assert changed["shares"] == shares
    assert _assert_consistent(api, database, "d")


def test_refused_requests_fix_nothing_and_a_pure_first_request_fixes_the_gaussian_order(
    api: Api,
) -> None:
    api.create_dataset("d", 1.0, DELTA)
    over = {"mechanism": "gaussian", "epsilon": 5.0, "delta": 1e-6}
    refused = api.post("/v1/datasets/d/releases", over)
    assert refused.status_code == 409 and refused.json()["code"] == "budget_exhausted"
    assert refused.json()["epsilon_after"] > 1.0
    assert _unfixed(_dataset(api)["shares"]) and len(_entries(api)) == 1
    # A cap change before any admission: the first admission fixes with the cap of its moment.
    api.patch("/v1/datasets/d", {"epsilon_cap": 1.5})
    answer = api.post("/v1/datasets/d/releases", LAPLACE)
    assert answer.status_code == 201, answer.text
    # Pure ε-DP is summed exactly by the pure member; the RDP shares go where Gaussian-family
    # histories (c·α) that reach the cap convert best.
    alpha = _expected_order(1.5, DELTA)
    _assert_fixed_for(answer.json()["dataset"]["shares"], alpha, seq=3)
    assert answer.json()["dataset"]["epsilon_spent"] == 0.1
    assert _verify(api)["ok"] is True


def test_the_first_decided_admission_of_a_batch_fixes_the_shares(
    api: Api, database: Database
) -> None:
    api.create_dataset("d", 2.0, DELTA)
    trainer = api.as_key(api.new_key("trainer", ["d"]))
    over: dict[str, Any] = {"mechanism": "gaussian", "epsilon": 9.0, "delta": 1e-6}
    plan: dict[str, Any] = {
        "sample_rate": 0.01,
        "steps_per_epoch": 50,
        "epochs": 2,
        "noise_multiplier": 2.0,
    }
    releases = "/v1/datasets/d/releases"
    requests: list[Request] = [(releases, over)] * 2 + [(releases, GAUSSIAN)] * 3
    requests += [("/v1/datasets/d/runs", plan)] * 2
    keys = [f"first-{i}" for i in range(len(requests))]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        with lane_held(_pipeline(api), "d") as wait_queued:
            futures = _post_together(pool, trainer, requests, keys)
            wait_queued(len(requests))
        responses = [f.result(timeout=DEADLINE) for f in futures]
    assert sorted(r.status_code for r in responses) == [201] * 5 + [409] * 2
    entries = _assert_consistent(api, database, "d")
    recording = [e for e in entries[1:] if "shares" in e["details"]]
    first = entries[1]
    assert recording == [first]  # one entry fixed them: the first admitted, whatever came first
    # A run's hold: repeats of the whole plan (q, all its steps, its σ); a Gaussian release:
    # c·α, whatever its σ.
    shares = _dataset(api)["shares"]
    if first["kind"] == "hold":
        alpha = _expected_order(2.0, DELTA, (0.01, 50 * 2), sigma=2.0)
    else:
        alpha = _expected_order(2.0, DELTA)
    _assert_fixed_for(shares, alpha, seq=2)
    assert first["details"]["shares"] == shares
    assert all(len(e["units"]) == len(shares["orders"]) for e in entries[1:])


def test_verify_finds_first_admission_shares_changed_behind_its_back(
    api: Api, database: Database
) -> None:
    api.create_dataset("d", 3.0, DELTA)
    assert api.post("/v1/datasets/d/releases", GAUSSIAN).status_code == 201
    assert _verify(api)["ok"] is True
    with database.write() as session:
        row = session.get(Dataset, "d")
        assert row is not None
        original = row.shares
        stored = json.loads(original)
        stored["weights"] = list(reversed(stored["weights"]))
        row.shares = json.dumps(stored)
    verified = _verify(api)
    assert verified["ok"] is False
    assert any("shares" in p for p in verified["problems"]), verified
    with database.write() as session:
        row = session.get(Dataset, "d")
        assert row is not None
        stored = json.loads(original)
        # As if the admission had never fixed them: unfixed, nothing posted, on the first grid.
        row.shares = json.dumps({**stored, "weights": [], "fixed_at_seq": None})
        row.orders = json.dumps([float(a) for a in DEFAULT_ORDERS])
        row.posted_units = row.pending_units = json.dumps([0] * len(DEFAULT_ORDERS))
    verified = _verify(api)
    assert verified["ok"] is False
    assert any("never fixed" in p for p in verified["problems"]), verified


@pytest.mark.parametrize(
    ("q", "steps_per_epoch", "epochs", "cap"),
    [
        (CIFAR_Q, CIFAR_STEPS, CIFAR_EPOCHS, 3.0),
        (CIFAR_Q, CIFAR_STEPS, CIFAR_EPOCHS, 8.0),
        (256 / 60000, 235, 60, 8.0),
    ],
    ids=["cifar-3", "cifar-8", "mnist-8"],
)
def test_a_plan_that_fills_an_empty_cap_needs_what_rdp_needs_within_1_percent(
    api: Api, q: float, steps_per_epoch: int, epochs: int, cap: float
) -> None:
    """The run shapes whose curves bend away from the Gaussian one, which the default fixed at
    creation serves at 1.5–5 % (docs/accounting.md §3.2)."""
    api.create_dataset("d", cap, DELTA)
    plan = {"sample_rate": q, "steps_per_epoch": steps_per_epoch, "epochs": epochs}
    response = api.post("/v1/datasets/d/runs", {**plan, "fit_remaining": True})
    assert response.status_code == 201, response.text
    sigma = response.json()["noise_multiplier"]
    steps = steps_per_epoch * epochs
    opacus = get_noise_multiplier(
        target_epsilon=cap, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
    )
    assert sigma / opacus <= 1.01, (sigma, opacus)
    assert cap * (1 - 1e-3) < response.json()["dataset"]["epsilon_reserved"] <= cap
    # A plan that fills fixes the order of its shape brought to the cap (σ-free).
    shares = response.json()["dataset"]["shares"]
    _assert_fixed_for(shares, _expected_order(cap, DELTA, (q, steps)), seq=2)
    # The smallest: on an empty dataset that σ is admitted and a little less noise is not.
    api.create_dataset("e", cap, DELTA)
    for factor, admitted in ((1.0, True), (1 - 2e-4, False)):
        dry = {**plan, "noise_multiplier": sigma * factor}
        answer = api.post("/v1/datasets/e/runs", dry, params={"dry_run": "true"})
        assert answer.status_code == 200 and answer.json()["admitted"] is admitted, answer.text
    # The goal (issue 12): a plan whose own ε at the full δ is at most cap / 1.01 is admitted.
    target = {**plan, "target_epsilon": cap / 1.01}
    assert api.post("/v1/datasets/e/runs", target).status_code == 201


def test_a_smoke_run_at_the_real_sigma_fixes_the_real_runs_order(api: Api) -> None:
    """One epoch first, then the whole run at the same σ: the smoke run announces repeats of
    itself, which is the real run, so the real run fills the cap within 1 % of RDP's σ."""
    q, steps, epochs, cap = 256 / 60000, 235, 60, 3.0
    sigma = get_noise_multiplier(
        target_epsilon=cap,
        target_delta=DELTA,
        sample_rate=q,
        steps=steps * epochs,
        accountant="rdp",
    )
    api.create_dataset("d", cap, DELTA)
    smoke = {"sample_rate": q, "steps_per_epoch": steps, "epochs": 1, "noise_multiplier": 4.0}
    smoke_run = api.post("/v1/datasets/d/runs", {**smoke, "noise_multiplier": sigma})
    assert smoke_run.status_code == 201, smoke_run.text
    run_id = smoke_run.json()["id"]
    assert api.post(f"/v1/runs/{run_id}/epochs").status_code == 201
    assert api.post(f"/v1/runs/{run_id}/complete").status_code == 200
    shares = _dataset(api)["shares"]
    _assert_fixed_for(shares, _expected_order(cap, DELTA, (q, steps), sigma=sigma), seq=2)
    full = {"sample_rate": q, "steps_per_epoch": steps, "epochs": epochs, "fit_remaining": True}
    answer = api.post("/v1/datasets/d/runs", full)
    assert answer.status_code == 201, answer.text
    assert answer.json()["noise_multiplier"] / sigma <= 1.01
