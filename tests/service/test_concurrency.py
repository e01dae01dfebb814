"""Many trainers at once against two server processes: the cap holds and the ledger adds up.

32 real threads, each with its own HTTP connection, plan runs, reserve epochs (within and
beyond their plans), make Laplace and Gaussian releases and complete or abort runs on one
dataset whose cap admits only part of the traffic, against `privacy-ledger serve --workers 2`;
meanwhile one run's lease lapses and a concurrent request expires it.
Afterwards everything a caller saw is checked against the ledger, and the ledger against an
independent recomputation of the dataset's curves.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import httpx

from accountant import exact
from accountant.mechanisms import Gaussian, PureDP, SubsampledGaussian
from accountant.members import MemberFilter, PureTotal, Shares
from service.storage.database import Database
from tests.service.conftest import ADMIN_KEY, Api, LiveServer, cached_budget, replay_units

THREADS = 32
REQUESTS_PER_THREAD = 12
TRAFFIC_SECONDS = 20.0
CLIENT_TIMEOUT = 30.0
DATASET, CAP, DELTA = "shared", 4.0, 1e-5
# One epoch is cheap next to the cap: 4 plans of 3 epochs take ~2.9 of it (5 take ~3.2, until
# the lapsing one expires), the rest goes to whichever beyond-plan epochs, new plans and
# releases come first; most of the traffic is refused.
PLAN = {"sample_rate": 0.02, "steps_per_epoch": 50, "epochs": 3, "noise_multiplier": 1.2}
LATE_PLAN = {**PLAN, "epochs": 2}
LAPSING_PLAN = {**PLAN, "lease_seconds": 1}
INITIAL_RUNS = 4
# Runs 0 and 1 are never finished, so their beyond-plan epochs meet the filter all along;
# run 2 is completed by several threads at once as their first request, and by no one else
# (a random abort of it could otherwise come first, however the threads are scheduled);
# the random completes and aborts take run 3 and the runs planned during the traffic.
STEADY_RUNS, RACED_RUN, RACERS = 2, 2, 4
FINISHABLE = RACED_RUN + 1
RELEASES: list[dict[str, Any]] = [
    {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.05, "values": [1.0, 2.0, 3.0]},
    {"mechanism": "gaussian", "sensitivity": 1.0, "epsilon": 0.2, "delta": 1e-6, "values": [5.0]},
]
SUCCESS = {"plan": 201, "epoch": 201, "release": 201, "complete": 200, "abort": 200, "read": 200}
REFUSALS = {
    "plan": {"budget_exhausted"},
    "epoch": {"budget_exhausted", "run_not_active"},
    "release": {"budget_exhausted"},
    "complete": {"run_not_active"},
    "abort": {"run_not_active"},
    "read": set(),
}


@dataclass(frozen=True)
class Seen:
    """One response a thread saw."""

    thread: int
    action: str
    run_id: str | None
    status: int
    body: Any


class RunPool:
    """Run ids the threads share: the planned ones, and those planned during the traffic."""

    def __init__(self, run_ids: list[str]) -> None:
        self._lock = threading.Lock()
        self._ids = list(run_ids)

    def add(self, run_id: str) -> None:
        with self._lock:
            self._ids.append(run_id)

    def any(self, rng: random.Random) -> str:
        with self._lock:
            return rng.choice(self._ids)

    def finishable(self, rng: random.Random) -> str:
        with self._lock:
            return rng.choice(self._ids[FINISHABLE:])


@dataclass(frozen=True)
class Traffic:
    """What every thread shares."""

    base: str
    pool: RunPool
    raced_run: str
    start: threading.Barrier
    deadline: float


def _trainer(index: int, key: str, traffic: Traffic) -> list[Seen]:
    """One thread's traffic: a bounded number of requests, stopped early at the deadline."""
    rng = random.Random(index)
    seen: list[Seen] = []
    pool = traffic.pool
    with httpx.Client(base_url=traffic.base, timeout=CLIENT_TIMEOUT) as http:
        caller = Api(http, key)
        traffic.start.wait(timeout=60)
        for request in range(REQUESTS_PER_THREAD):
            if time.monotonic() > traffic.deadline:
                break
            roll = rng.random()
            run_id: str | None = None
            if request == 0 and index < RACERS:
                action, run_id = "complete", traffic.raced_run
                response = caller.post(f"/v1/runs/{run_id}/complete")
            elif roll < 0.45:
                action, run_id = "epoch", pool.any(rng)
                response = caller.post(f"/v1/runs/{run_id}/epochs")
            elif roll < 0.80:
                action = "release"
                response = caller.post(f"/v1/datasets/{DATASET}/releases", rng.choice(RELEASES))
            elif roll < 0.88:
                action = "read"
                response = caller.get(f"/v1/datasets/{DATASET}")
            elif roll < 0.95:
                action = "plan"
                response = caller.post(f"/v1/datasets/{DATASET}/runs", LATE_PLAN)
                if response.status_code == 201:
                    pool.add(response.json()["id"])
            else:
                action, run_id = rng.choice(["complete", "abort"]), pool.finishable(rng)
                response = caller.post(f"/v1/runs/{run_id}/{action}")
            json_body = "json" in response.headers.get("content-type", "")
            body = response.json() if json_body else response.text
            seen.append(Seen(index, action, run_id, response.status_code, body))
    return seen


def _ledger(auditor: Api) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    while True:
        params = {"limit": 1000, "after": entries[-1]["seq"] if entries else 0}
        page = auditor.get(f"/v1/datasets/{DATASET}/ledger", params=params)
        assert page.status_code == 200, page.text
        entries.extend(page.json()["data"])
        if not page.json()["has_more"]:
            return entries


def _dataset_figures(seen: Seen) -> dict[str, Any] | None:
    """The dataset figures a response carries: its `dataset`, itself, or a refusal's numbers."""
    if not isinstance(seen.body, dict):
        return None
    if seen.action == "read":
        return seen.body
    if "dataset" in seen.body:
        return dict(seen.body["dataset"])
    if seen.body.get("code") == "budget_exhausted":
        return seen.body
    return None


def test_concurrent_traffic_never_overspends(live_server: LiveServer, database: Database) -> None:
    base = live_server(workers=2)
    with httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT) as http:
        admin = Api(http, ADMIN_KEY)
        admin.create_dataset(DATASET, CAP, DELTA)
        trainer_keys = [admin.new_key("trainer", [DATASET]) for _ in range(4)]
        auditor = admin.as_key(admin.new_key("auditor", [DATASET]))
        planned = []
        for _ in range(INITIAL_RUNS):
            response = admin.as_key(trainer_keys[0]).post(f"/v1/datasets/{DATASET}/runs", PLAN)
            assert response.status_code == 201, response.text
            planned.append(response.json())
        raced_run = planned[RACED_RUN]["id"]
        pool = RunPool([run["id"] for run in planned])
        # A run nobody touches, whose lease lapses during the traffic: whichever request on
        # the dataset comes next expires it (exactly once) and its hold goes back to the rest.
        lapsing = admin.as_key(trainer_keys[1]).post(f"/v1/datasets/{DATASET}/runs", LAPSING_PLAN)
        assert lapsing.status_code == 201, lapsing.text
        lapsing_id = lapsing.json()["id"]

        began = time.monotonic()
        traffic = Traffic(
            base, pool, raced_run, threading.Barrier(THREADS), began + TRAFFIC_SECONDS
        )
        with ThreadPoolExecutor(max_workers=THREADS) as executor:
            futures = [
                executor.submit(_trainer, i, trainer_keys[i % len(trainer_keys)], traffic)
                for i in range(THREADS)
            ]
            seen = [item for future in futures for item in future.result()]
        assert time.monotonic() - began < TRAFFIC_SECONDS + CLIENT_TIMEOUT

        # Every answer is a success or one of the refusals the operation may give; no 5xx.
        for item in seen:
            assert item.status < 500, item
            if item.status != SUCCESS[item.action]:
                assert item.status == 409, item
                assert item.body["code"] in REFUSALS[item.action], item
        # No response, admitted or refused, ever showed the dataset beyond its cap.
        for item in seen:
            figures = _dataset_figures(item)
            if figures is not None:
                assert figures["epsilon_spent"] <= CAP, item
                assert figures["epsilon_reserved"] <= CAP, item
                assert figures["epsilon_spent"] <= figures["epsilon_reserved"], item

        admitted = [s for s in seen if s.status == SUCCESS[s.action] and s.action != "read"]
        epochs = [s.body for s in admitted if s.action == "epoch"]
        releases = [s.body for s in admitted if s.action == "release"]
        plans = [s.body for s in admitted if s.action == "plan"]
        finishes = [s for s in admitted if s.action in ("complete", "abort")]
        codes = Counter(s.body["code"] for s in seen if s.status == 409)
        # The traffic really did contend: the cap refused some of it and admitted some.
        assert codes["budget_exhausted"] > 0, codes
        assert codes["run_not_active"] > 0, codes
        assert releases and epochs
        assert any(e["beyond_plan"] for e in epochs)
        assert {m["mechanism"] for m in releases} == {"laplace", "gaussian"}
        # Exactly one of the racing completes of the same run won.
        raced = [s for s in seen if s.run_id == raced_run and s.action == "complete"]
        assert len(raced) >= RACERS
        assert sum(s.status == 200 for s in raced) == 1, raced
        # A within-plan epoch is charged from its hold: never refused for budget.
        for item in seen:
            if (
                item.action == "epoch"
                and item.status == 409
                and item.body["code"] == "budget_exhausted"
            ):
                assert "beyond the plan" in item.body["detail"], item

        final = auditor.get(f"/v1/datasets/{DATASET}")
        assert final.status_code == 200, final.text
        dataset = final.json()
        assert dataset["epsilon_spent"] <= dataset["epsilon_reserved"] <= CAP
        verified = auditor.get(f"/v1/datasets/{DATASET}/ledger/verify").json()
        assert verified["ok"] is True, verified
        entries = _ledger(auditor)
        listed = auditor.get(f"/v1/datasets/{DATASET}/runs", params={"limit": 1000})
        assert listed.status_code == 200, listed.text
        runs = {run["id"]: run for run in listed.json()["data"]}

    # The ledger: seq 1..N without gaps, nothing but the kinds this traffic writes.
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert len(entries) == dataset["ledger_seq"] == verified["last_seq"]
    by_seq = {e["seq"]: e for e in entries}
    kinds = Counter(e["kind"] for e in entries)
    assert set(kinds) <= {"dataset_created", "hold", "charge", "release_hold"}, kinds
    for previous, entry in itertools.pairwise(entries):
        assert entry["epsilon_spent_after"] >= previous["epsilon_spent_after"]
    for entry in entries:
        assert entry["epsilon_spent_after"] <= entry["epsilon_reserved_after"] <= CAP, entry

    # Every admitted epoch and release is exactly one charge, and every charge is one of them.
    charge_seqs = [e["seq"] for e in entries if e["kind"] == "charge"]
    admitted_seqs = [b["ledger_seq"] for b in epochs] + [b["ledger_seq"] for b in releases]
    assert len(admitted_seqs) == len(set(admitted_seqs))
    assert sorted(admitted_seqs) == charge_seqs
    assert kinds["charge"] == len(epochs) + len(releases)
    for body in epochs:
        entry = by_seq[body["ledger_seq"]]
        assert (entry["kind"], entry["run_id"], entry["release_id"]) == (
            "charge",
            body["run_id"],
            None,
        )
        assert entry["details"] == {"epoch": body["epoch"], "from_hold": not body["beyond_plan"]}
        # The answer shows the dataset right after its own entry.
        assert body["dataset"]["ledger_seq"] == entry["seq"]
        assert body["dataset"]["epsilon_spent"] == entry["epsilon_spent_after"]
        assert body["dataset"]["epsilon_reserved"] == entry["epsilon_reserved_after"]
    for body in releases:
        entry = by_seq[body["ledger_seq"]]
        assert (entry["kind"], entry["release_id"], entry["run_id"]) == ("charge", body["id"], None)
        assert body["dataset"]["ledger_seq"] == entry["seq"]
        assert body["dataset"]["epsilon_spent"] == entry["epsilon_spent_after"]
        assert len(body["noised_values"]) == entry["details"]["values"]

    # Per run: epochs 1..k, each charged once, k = the run's epochs_charged; beyond the plan
    # exactly when k exceeds the planned epochs.
    for run_id, run in runs.items():
        charged = sorted(b["epoch"] for b in epochs if b["run_id"] == run_id)
        assert charged == list(range(1, run["epochs_charged"] + 1)), run_id
        beyond = sorted(b["epoch"] for b in epochs if b["run_id"] == run_id and b["beyond_plan"])
        assert beyond == list(range(run["epochs"] + 1, run["epochs_charged"] + 1)), run_id

    # One hold per planned run; one release_hold per run finished, by the one that won, and
    # one for the run whose lease lapsed, by the system.
    all_runs = {run["id"] for run in planned} | {body["id"] for body in plans} | {lapsing_id}
    assert set(runs) == all_runs
    holds = [e["run_id"] for e in entries if e["kind"] == "hold"]
    assert sorted(holds) == sorted(all_runs)
    released = sorted(
        (e["run_id"], e["details"]["reason"]) for e in entries if e["kind"] == "release_hold"
    )
    won = sorted((s.run_id, "completed" if s.action == "complete" else "aborted") for s in finishes)
    assert released == sorted([*won, (lapsing_id, "expired")])
    for run_id, reason in [*won, (lapsing_id, "expired")]:
        assert runs[run_id]["status"] == reason
    (expiry,) = [e for e in entries if e["kind"] == "release_hold" and e["run_id"] == lapsing_id]
    assert expiry["actor"] == "system"
    assert expiry["details"] == {"reason": "expired", "epochs_released": PLAN["epochs"]}
    active = {run_id for run_id, run in runs.items() if run["status"] == "active"}
    assert active == all_runs - {run_id for run_id, _ in won} - {lapsing_id}

    # Independently: replay the entries' units by kind and compare with the cached curves.
    budget = cached_budget(database, DATASET)
    orders = budget.orders
    zero = [0] * len(orders)
    posted, pending = replay_units(entries, len(orders))
    assert budget.posted == posted
    assert budget.pending == pending

    # ... and each entry's units are the mechanism's own curve, computed here.
    def epoch_units(run: dict[str, Any]) -> list[int]:
        mechanism = SubsampledGaussian(
            run["sample_rate"], run["noise_multiplier"], run["steps_per_epoch"]
        )
        return exact.to_units(mechanism.rdp(orders))

    def release_mechanism(body: dict[str, Any]) -> PureDP | Gaussian:
        # Noised by the service: discrete Laplace is charged as its pure ε, discrete Gaussian
        # as σ over the rounded values' sensitivity, rounded down (docs/accounting.md §8).
        if body["mechanism"] == "laplace":
            return PureDP(body["epsilon"])
        # σ in value units rounded down from the exact variance, over Δ_rounded, rounded down.
        noise = body["noise"]
        variance = Fraction(noise["exact_parameter"]) * Fraction(noise["grid"]) ** 2
        sigma = body["noise_scale"]  # rounded up
        while Fraction(sigma) ** 2 > variance:
            sigma = math.nextafter(sigma, 0.0)
        ratio = Fraction(sigma) / Fraction(noise["sensitivity_after_rounding"])
        multiplier = float(ratio)
        if Fraction(multiplier) > ratio:
            multiplier = math.nextafter(multiplier, 0.0)
        return Gaussian(multiplier)

    release_units = {
        body["id"]: exact.to_units(release_mechanism(body).rdp(orders)) for body in releases
    }
    for entry in entries:
        if entry["kind"] == "charge" and entry["run_id"] is not None:
            assert entry["units"] == epoch_units(runs[entry["run_id"]])
        elif entry["kind"] == "charge":
            assert entry["units"] == release_units[entry["release_id"]]
        elif entry["kind"] == "hold":
            per_epoch = epoch_units(runs[entry["run_id"]])
            assert entry["units"] == [runs[entry["run_id"]]["epochs"] * u for u in per_epoch]
    # What is still held is exactly the unspent plan of the runs still active.
    expected_pending = list(zero)
    for run_id in active:
        left = max(0, runs[run_id]["epochs"] - runs[run_id]["epochs_charged"])
        expected_pending = exact.add(
            expected_pending, [left * u for u in epoch_units(runs[run_id])]
        )
    assert pending == expected_pending

    # The reported figures are the member filter's ε of those curves (the dataset's shares as
    # the entry that fixed them recorded them: its first, or, for first_admission, its first
    # admission), within the cap. DP-SGD runs are in the history, so the pure-sum member
    # cannot decide: only the RDP members do.
    recorded = dict([e["details"]["shares"] for e in entries if "shares" in e["details"]][-1])
    assert recorded["weights"], "the shares were never fixed"
    filter_profiles = {"dp_sgd": "default", "first_admission": "default"}
    profile = filter_profiles.get(recorded["profile"], recorded["profile"])
    cap_filter = MemberFilter(CAP, DELTA, Shares.from_params({**recorded, "profile": profile}))
    impure = PureTotal(Fraction(0), 1)
    spent = cap_filter.epsilon(exact.to_curve(posted), impure)
    reserved = cap_filter.epsilon(exact.to_curve(exact.add(posted, pending)), impure)
    assert dataset["epsilon_spent"] == spent <= CAP
    assert dataset["epsilon_reserved"] == reserved <= CAP
