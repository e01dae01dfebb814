"""Idempotency-Key under concurrent retries, against `privacy-ledger serve --workers 2`.

A key is scoped to the API key that sends it. The first *successful* response is stored, in
the same transaction as its ledger entry, and replayed to every later request with the same
key and the same method, path, query and body (`Idempotent-Replayed: true`); the same key with
a different request is refused with 422 `idempotency_conflict`. Refusals (409
`budget_exhausted`, …) and dry runs are not stored: a retry with the same key is decided
afresh, so once budget is freed it can be admitted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.service.conftest import ADMIN_KEY, Api, LiveServer

STORM = 20
TIMEOUT = 30.0
PLAN: dict[str, Any] = {
    "sample_rate": 0.01,
    "steps_per_epoch": 100,
    "epochs": 3,
    "noise_multiplier": 1.5,
}
RELEASE: dict[str, Any] = {
    "mechanism": "laplace",
    "sensitivity": 1.0,
    "epsilon": 0.5,
    "values": [1.0, 2.0, 3.0],
}
REPLAYED = "Idempotent-Replayed"

Request = tuple[str, str, dict[str, Any] | None]  # bearer key, path, JSON body


def _storm(base: str, requests: Sequence[Request], idempotency_key: str) -> list[httpx.Response]:
    """Send every request at once, each from its own thread and connection, with one key."""
    barrier = threading.Barrier(len(requests))

    def send(request: Request) -> httpx.Response:
        key, path, body = request
        with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
            barrier.wait(timeout=TIMEOUT)
            return Api(http, key).post(path, body, headers={"Idempotency-Key": idempotency_key})

    with ThreadPoolExecutor(max_workers=len(requests)) as executor:
        return list(executor.map(send, requests))


def _ledger(admin: Api, dataset_id: str) -> list[dict[str, Any]]:
    response = admin.get(f"/v1/datasets/{dataset_id}/ledger", params={"limit": 1000})
    assert response.status_code == 200, response.text
    assert response.json()["has_more"] is False
    return list(response.json()["data"])


def _assert_one_first_response(responses: list[httpx.Response]) -> dict[str, Any]:
    """All 201 with one body; exactly one is the original, every other one a replay."""
    assert [r.status_code for r in responses] == [201] * len(responses), [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert all(body == bodies[0] for body in bodies)
    replayed = [r.headers.get(REPLAYED) for r in responses]
    assert replayed.count("true") == len(responses) - 1, replayed
    assert replayed.count(None) == 1, replayed
    return dict(bodies[0])


def test_concurrent_retries(live_server: LiveServer) -> None:
    """20 concurrent retries with one key, each case on its own dataset of one live server."""
    base = live_server(workers=2)
    with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        admin = Api(http, ADMIN_KEY)
        for operation in ("epoch", "release", "run"):
            _retries_are_admitted_once(base, admin, operation)
        _keys_are_scoped_to_the_api_key(base, admin)
        _one_key_on_two_datasets_at_once(base, admin)


def _retries_are_admitted_once(base: str, admin: Api, operation: str) -> None:
    """All 20 get the first response; one entry is written; the key then refuses other requests."""
    dataset = f"retry-{operation}"
    admin.create_dataset(dataset, 8.0)
    trainer = admin.new_key("trainer", [dataset])
    key = {"Idempotency-Key": f"key-{operation}"}

    def new_epoch() -> tuple[str, dict[str, Any] | None]:
        run = admin.post(f"/v1/datasets/{dataset}/runs", PLAN)
        assert run.status_code == 201, run.text
        return f"/v1/runs/{run.json()['id']}/epochs", None

    if operation == "epoch":
        path, body = new_epoch()
    elif operation == "release":
        path, body = f"/v1/datasets/{dataset}/releases", RELEASE
    else:
        path, body = f"/v1/datasets/{dataset}/runs", PLAN
    before = _ledger(admin, dataset)

    responses = _storm(base, [(trainer, path, body)] * STORM, key["Idempotency-Key"])

    first = _assert_one_first_response(responses)
    entries = _ledger(admin, dataset)
    assert len(entries) == len(before) + 1  # one entry written, whatever the race
    entry = entries[-1]
    assert entry["idempotency_key"] == key["Idempotency-Key"]
    assert entry["actor"] == trainer.split("_")[1]
    if operation == "epoch":
        assert entry["kind"] == "charge"
        assert (entry["seq"], entry["run_id"]) == (first["ledger_seq"], first["run_id"])
        assert first["epoch"] == 1
        assert admin.get(f"/v1/runs/{first['run_id']}").json()["epochs_charged"] == 1
    elif operation == "release":
        assert entry["kind"] == "charge"
        assert (entry["seq"], entry["release_id"]) == (first["ledger_seq"], first["id"])
        # Every replay hands back the noise drawn once, not a fresh draw.
        assert len(first["noised_values"]) == len(RELEASE["values"])
        assert first["noised_values"] != RELEASE["values"]
    else:
        assert (entry["kind"], entry["run_id"]) == ("hold", first["id"])
        runs = admin.get(f"/v1/datasets/{dataset}/runs").json()["data"]
        assert [r["id"] for r in runs] == [first["id"]]
    assert first["dataset"]["ledger_seq"] == entry["seq"]

    # A later retry still replays; the same key for a different request is refused.
    caller = admin.as_key(trainer)
    again = caller.post(path, body, headers=key)
    assert again.status_code == 201 and again.json() == first
    assert again.headers[REPLAYED] == "true"
    if operation == "epoch":
        other_path, other_body = new_epoch()  # another run's epoch: a different path
    else:
        other_path, other_body = path, {**(body or {}), "name": "something else"}
    seq = len(_ledger(admin, dataset))
    conflict = caller.post(other_path, other_body, headers=key)
    assert conflict.status_code == 422, conflict.text
    assert conflict.json()["code"] == "idempotency_conflict"
    assert REPLAYED not in conflict.headers
    assert len(_ledger(admin, dataset)) == seq
    assert admin.get(f"/v1/datasets/{dataset}").json()["ledger_seq"] == seq


def _keys_are_scoped_to_the_api_key(base: str, admin: Api) -> None:
    """Two API keys racing with one Idempotency-Key get two independent charges."""
    admin.create_dataset("scoped", 8.0)
    alice, bob = admin.new_key("trainer", ["scoped"]), admin.new_key("trainer", ["scoped"])
    path = "/v1/datasets/scoped/releases"
    requests = [(alice if i % 2 else bob, path, RELEASE) for i in range(STORM)]

    responses = _storm(base, requests, "shared-key")

    by_holder = {
        holder: [r for (key, _, _), r in zip(requests, responses, strict=True) if key == holder]
        for holder in (alice, bob)
    }
    firsts = {holder: _assert_one_first_response(rs) for holder, rs in by_holder.items()}
    assert firsts[alice]["id"] != firsts[bob]["id"]
    assert firsts[alice]["noised_values"] != firsts[bob]["noised_values"]
    charges = [e for e in _ledger(admin, "scoped") if e["kind"] == "charge"]
    assert len(charges) == 2
    assert {(e["actor"], e["release_id"]) for e in charges} == {
        (holder.split("_")[1], firsts[holder]["id"]) for holder in (alice, bob)
    }
    assert {e["idempotency_key"] for e in charges} == {"shared-key"}


def _one_key_on_two_datasets_at_once(base: str, admin: Api) -> None:
    """The same key for two different requests racing on two datasets: one wins, once.

    Different datasets do not share a row lock, so on PostgreSQL both admissions may run
    at the same time; the key's uniqueness decides at commit, and the loser's ledger
    entry is rolled back with it.
    """
    admin.create_dataset("a", 8.0)
    admin.create_dataset("b", 8.0)
    trainer = admin.new_key("trainer", ["a", "b"])
    requests = [(trainer, f"/v1/datasets/{'ab'[i % 2]}/releases", RELEASE) for i in range(STORM)]

    responses = _storm(base, requests, "one-key")

    won = [r for r in responses if r.status_code == 201]
    lost = [r for r in responses if r.status_code != 201]
    assert len(won) == STORM // 2 and len(lost) == STORM // 2, [r.text for r in lost]
    winner = won[0].json()["dataset_id"]
    assert {r.json()["dataset_id"] for r in won} == {winner}
    _assert_one_first_response(won)
    assert {(r.status_code, r.json()["code"]) for r in lost} == {(422, "idempotency_conflict")}
    loser = "b" if winner == "a" else "a"
    assert [e["kind"] for e in _ledger(admin, winner)] == ["dataset_created", "charge"]
    assert [e["kind"] for e in _ledger(admin, loser)] == ["dataset_created"]
    assert admin.get(f"/v1/datasets/{loser}").json()["epsilon_spent"] == 0.0
    verified = admin.get(f"/v1/datasets/{loser}/ledger/verify").json()
    assert verified["ok"] is True, verified


def test_refusals_are_not_recorded(api: Api) -> None:
    """A 409 is not stored under its key: the same retry is admitted once budget is freed.

    Only successful answers are stored (service/domain/pipeline.py stores the record with the
    admission's entry, and a refusal writes neither), so a trainer that retries a
    refused release with the same key is decided afresh each time — refused while the budget
    is held, admitted once a run gives its hold back — and is still charged only once.
    """
    # Uniform shares: this short plan is off the default profile's shape (docs/accounting.md).
    api.create_dataset("d", 3.0, shares={"profile": "uniform"})
    trainer = api.as_key(api.new_key("trainer", ["d"]))
    plan = {"sample_rate": 0.01, "steps_per_epoch": 100, "epochs": 3, "target_epsilon": 2.0}
    run = trainer.post("/v1/datasets/d/runs", plan)
    assert run.status_code == 201, run.text
    release = {"mechanism": "laplace", "epsilon": 1.5, "values": [10.0]}
    retry = {"Idempotency-Key": "release-1"}

    for _ in range(2):
        refused = trainer.post("/v1/datasets/d/releases", release, headers=retry)
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "budget_exhausted"
        assert REPLAYED not in refused.headers
    seq = api.get("/v1/datasets/d").json()["ledger_seq"]
    assert [e["kind"] for e in _ledger(api, "d")] == ["dataset_created", "hold"]

    aborted = trainer.post(f"/v1/runs/{run.json()['id']}/abort")
    assert aborted.status_code == 200, aborted.text

    admitted = trainer.post("/v1/datasets/d/releases", release, headers=retry)
    assert admitted.status_code == 201, admitted.text
    assert REPLAYED not in admitted.headers
    assert admitted.json()["ledger_seq"] == seq + 2  # after the release_hold
    replay = trainer.post("/v1/datasets/d/releases", release, headers=retry)
    assert replay.status_code == 201 and replay.headers[REPLAYED] == "true"
    assert replay.json() == admitted.json()
    charges = [e for e in _ledger(api, "d") if e["kind"] == "charge"]
    assert [(e["release_id"], e["idempotency_key"]) for e in charges] == [
        (admitted.json()["id"], "release-1")
    ]


def test_dry_runs_are_not_recorded(api: Api) -> None:
    """A dry run with a key stores nothing: the real request with that key is admitted."""
    api.create_dataset("d", 3.0)
    trainer = api.as_key(api.new_key("trainer", ["d"]))
    retry = {"Idempotency-Key": "dry-then-real"}
    body = {"mechanism": "gaussian", "epsilon": 0.5, "delta": 1e-6}
    dry = trainer.post("/v1/datasets/d/releases?dry_run=true", body, headers=retry)
    assert dry.status_code == 200 and dry.json()["admitted"] is True
    real = trainer.post("/v1/datasets/d/releases", body, headers=retry)
    assert real.status_code == 201, real.text
    assert REPLAYED not in real.headers
    assert [e["kind"] for e in _ledger(api, "d")] == ["dataset_created", "charge"]


def test_a_first_answer_is_the_recorded_text_and_its_replay_the_same_bytes(api: Api) -> None:
    """The first answer to a key is the text its record keeps (rendered once, under the lock),
    so the replay is byte for byte the first answer, headers aside."""
    api.create_dataset("d", 5.0)
    trainer = api.as_key(api.new_key("trainer", ["d"]))
    headers = {"Idempotency-Key": "argmax-1"}
    votes = {"mechanism": "noisy_argmax", "teachers": 9, "votes": [[5, 3, 1]] * 4}
    for body in (RELEASE, {**votes, "noise_scale": 20.0}):
        first = trainer.post("/v1/datasets/d/releases", body, headers=headers)
        assert first.status_code == 201, first.text
        replay = trainer.post("/v1/datasets/d/releases", body, headers=headers)
        assert replay.headers[REPLAYED] == "true" and replay.content == first.content
        assert first.headers["content-type"] == replay.headers["content-type"]
        assert first.headers["content-type"] == "application/json"
        headers = {"Idempotency-Key": "argmax-2"}


def test_a_recorded_text_answers_its_own_result_once() -> None:
    from service.api import render

    first, other = object(), object()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(render, "answer", lambda result: (201, {"which": id(result)}))
        status, text = render.recorded(first)
    assert render.first_answer(other) is None
    assert render.first_answer(first) == (status, text)
    assert render.first_answer(first) is None  # taken once
