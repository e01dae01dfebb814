"""Combined commits: admissions decided and committed together still answer one by one.

The admission pipeline (service/domain/pipeline.py) combines the admissions that arrive
together in one process: one thread leads a batch, locks once, decides each admission in
arrival order against the state the previous ones left, stores each one's ledger entry and
idempotency record, and commits them all at once. What a caller of such a batch sees:

1. Releases the cap admits, releases it refuses, requests the domain finds invalid and epochs
   of a completed run, all in one batch: each admitted one gets its own answer and exactly one
   entry, every other one changes nothing (a retry with its key is decided afresh), the chain
   verifies and the dataset's figures are the replay of its entries.
2. Identical requests with one Idempotency-Key in one batch: one charge; every one of them gets
   the first answer, all but one as a replay; the same key with another body gets 422.
3. kill -9 of a server while combined commits are in flight: after a restart every answered
   request is in the ledger exactly once, nothing else is but requests whose answer the kill
   swallowed, and retrying every request with its key charges only those whose commit died.
4. Two `privacy-ledger serve` processes on one PostgreSQL database, hammered at once: together
   they admit exactly what the cap allows, not one release more.

Tests 1 and 2 make the batch certain rather than likely: an admission whose `decide` blocks
holds the pipeline's lane while the requests queue behind it (counted in the queue itself), so
they are all decided as the next batch; `ledger_batch_size` shows it was one batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service import metrics
from service.domain.errors import NotFound
from service.domain.pipeline import Admission, Pipeline
from service.storage.database import Database
from service.storage.models import Dataset
from tests.service.conftest import ADMIN_KEY, Api, cached_budget, replay_units
from tests.service.test_crash import Servers

DEADLINE = 60.0
TIMEOUT = 30.0
REPLAYED = "Idempotent-Replayed"
# Ten of these fit a cap of 1.0 exactly: pure ε-DP, summed exactly by the pure-sum member.
TENTH: dict[str, Any] = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.1}
PLAN: dict[str, Any] = {
    "sample_rate": 0.01,
    "steps_per_epoch": 10,
    "epochs": 1,
    "noise_multiplier": 5.0,
}

Request = tuple[str, dict[str, Any] | None]  # path, JSON body


# -- holding the lane -------------------------------------------------------------------------


def _queued(pipeline: Pipeline) -> int:
    """Admissions waiting in the pipeline's lane behind the batch being decided."""
    with pipeline._mutex:
        return len(pipeline._lane.waiting)


@contextmanager
def lane_held(pipeline: Pipeline, dataset_id: str) -> Iterator[Callable[[int], None]]:
    """Hold the pipeline's lane: an admission whose `decide` blocks leads a batch of its own, so
    whatever is submitted meanwhile queues and is decided as the next batch once the block ends.

    Yields `wait_queued(n)`, which returns once n admissions wait (polled, with a deadline).
    """
    entered, release = threading.Event(), threading.Event()

    def hold(_session: Session, _dataset: Dataset | None) -> None:
        entered.set()
        if not release.wait(DEADLINE):
            raise TimeoutError("the lane was never released")

    def wait_queued(count: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while _queued(pipeline) < count:
            assert time.monotonic() < deadline, f"{_queued(pipeline)} of {count} queued"
            time.sleep(0.005)
        assert _queued(pipeline) == count

    with ThreadPoolExecutor(max_workers=1) as holder:
        held = holder.submit(pipeline.submit, Admission(hold, dataset_id=dataset_id))
        try:
            assert entered.wait(DEADLINE), "the holding admission never ran"
            yield wait_queued
        finally:
            release.set()
        held.result(timeout=DEADLINE)


def _batches() -> tuple[float, float]:
    """(batches, admissions in them) so far in this process, from `ledger_batch_size`."""
    samples = {s.name: s.value for family in metrics.BATCH_SIZE.collect() for s in family.samples}
    return samples["ledger_batch_size_count"], samples["ledger_batch_size_sum"]


def _lock_waits() -> float:
    """Write transactions that took their locks so far in this process (`ledger_lock_wait`)."""
    samples = {s.name: s.value for family in metrics.LOCK_WAIT.collect() for s in family.samples}
    return samples["ledger_lock_wait_seconds_count"]


def _post_together(
    pool: ThreadPoolExecutor, caller: Api, requests: list[Request], keys: list[str]
) -> list[Future[httpx.Response]]:
    """Post every request from its own thread, released together by a barrier."""
    barrier = threading.Barrier(len(requests))

    def send(request: Request, key: str) -> httpx.Response:
        path, body = request
        barrier.wait(timeout=DEADLINE)
        return caller.post(path, body, headers={"Idempotency-Key": key})

    return [pool.submit(send, r, k) for r, k in zip(requests, keys, strict=True)]


def _pipeline(api: Api) -> Pipeline:
    """The pipeline every write of the in-process app goes through."""
    pipeline: Pipeline = api.client.app.state.pipeline  # type: ignore[union-attr]
    return pipeline


# -- reading the ledger -----------------------------------------------------------------------


def _entries(admin: Api, dataset_id: str) -> list[dict[str, Any]]:
    export = admin.get(f"/v1/datasets/{dataset_id}/ledger", params={"format": "export"})
    assert export.status_code == 200, export.text
    entries: list[dict[str, Any]] = export.json()["data"]
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    return entries


def _assert_consistent(admin: Api, database: Database, dataset_id: str) -> list[dict[str, Any]]:
    """The chain verifies, and the cached curves and figures are the replay of the entries."""
    verified = admin.get(f"/v1/datasets/{dataset_id}/ledger/verify").json()
    assert verified["problems"] == [], verified
    assert verified["ok"] and verified["chain_ok"] and verified["replay_ok"], verified
    entries = _entries(admin, dataset_id)
    assert verified["entries"] == verified["last_seq"] == len(entries)
    budget = cached_budget(database, dataset_id)
    posted, pending = replay_units(entries, len(budget.orders))
    assert (budget.posted, budget.pending) == (posted, pending)
    dataset = admin.get(f"/v1/datasets/{dataset_id}").json()
    assert dataset["ledger_seq"] == len(entries)
    assert dataset["epsilon_spent"] == entries[-1]["epsilon_spent_after"]
    assert dataset["epsilon_reserved"] == entries[-1]["epsilon_reserved_after"]
    return entries


# -- 1. refusals and invalid requests inside a batch ------------------------------------------


def test_refused_and_invalid_admissions_in_a_batch_change_nothing(
    api: Api, database: Database
) -> None:
    dataset_id, cap = "batched", 1.0
    api.create_dataset(dataset_id, cap)
    trainer = api.as_key(api.new_key("trainer", [dataset_id]))
    run = trainer.post(f"/v1/datasets/{dataset_id}/runs", PLAN)
    assert run.status_code == 201, run.text
    completed = run.json()["id"]
    assert trainer.post(f"/v1/runs/{completed}/complete").status_code == 200
    before = _entries(api, dataset_id)

    releases = f"/v1/datasets/{dataset_id}/releases"
    fit, over = 10, 4
    requests: list[Request] = [(releases, TENTH)] * (fit + over)
    invalid: list[Request] = [  # the schema lets these through; the domain refuses them
        (releases, {"mechanism": "laplace", "epsilon": 0.1, "delta": 1e-6}),
        (releases, {"mechanism": "gaussian", "epsilon": 0.1}),
        (releases, {"mechanism": "laplace", "epsilon": 0.1, "noise_scale": 10.0}),
    ]
    inactive: list[Request] = [(f"/v1/runs/{completed}/epochs", None)] * 3
    requests += invalid + inactive
    keys = [f"mixed-{i}" for i in range(len(requests))]

    batches, admissions = _batches()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        with lane_held(_pipeline(api), dataset_id) as wait_queued:
            futures = _post_together(pool, trainer, requests, keys)
            wait_queued(len(requests))
        responses = [f.result(timeout=DEADLINE) for f in futures]
    # The holding admission was one batch; every request was the next one.
    assert _batches() == (batches + 2, admissions + 1 + len(requests))

    outcomes = Counter((r.status_code, r.json().get("code")) for r in responses)
    assert outcomes == {
        (201, None): fit,
        (409, "budget_exhausted"): over,
        (422, "validation_error"): len(invalid),
        (409, "run_not_active"): len(inactive),
    }, [r.text for r in responses]
    admitted = {k: r.json() for k, r in zip(keys, responses, strict=True) if r.status_code == 201}
    # Each was decided against what the ones before it left: every refusal saw the cap full.
    for response in responses:
        if response.json().get("code") == "budget_exhausted":
            assert response.json()["epsilon_spent"] == cap, response.text

    # Each admitted release is exactly one entry, the one its answer names, and its answer shows
    # the dataset as its own entry left it (not as the batch ended).
    entries = _assert_consistent(api, database, dataset_id)
    assert entries[: len(before)] == before
    written = entries[len(before) :]
    assert len(written) == fit
    by_key = {e["idempotency_key"]: e for e in written}
    assert set(by_key) == set(admitted)
    for key, answer in admitted.items():
        entry = by_key[key]
        assert (entry["kind"], entry["release_id"]) == ("charge", answer["id"])
        assert entry["seq"] == answer["ledger_seq"] == answer["dataset"]["ledger_seq"]
        assert answer["dataset"]["epsilon_spent"] == entry["epsilon_spent_after"]
    assert entries[-1]["epsilon_spent_after"] == cap
    assert trainer.get(f"/v1/runs/{completed}").json()["epochs_charged"] == 0

    # Only the admitted ones stored their answer: a retry with any other key is decided afresh.
    for (path, body), key, first in zip(requests, keys, responses, strict=True):
        again = trainer.post(path, body, headers={"Idempotency-Key": key})
        assert (again.status_code, again.json()) == (first.status_code, first.json())
        assert again.headers.get(REPLAYED) == ("true" if key in admitted else None)
    assert _entries(api, dataset_id) == entries


# -- 2. one Idempotency-Key several times in a batch ------------------------------------------


def test_identical_keys_in_one_batch_charge_once(api: Api, database: Database) -> None:
    dataset_id, identical = "replays", 12
    api.create_dataset(dataset_id, 10.0)
    trainer = api.as_key(api.new_key("trainer", [dataset_id]))
    path = f"/v1/datasets/{dataset_id}/releases"
    body = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.5, "values": [1.0, 2.0]}
    other = {**body, "values": [3.0]}
    key = "one-key"
    before = _entries(api, dataset_id)

    batches, admissions = _batches()
    with ThreadPoolExecutor(max_workers=identical + 1) as pool:
        with lane_held(_pipeline(api), dataset_id) as wait_queued:
            same = _post_together(pool, trainer, [(path, body)] * identical, [key] * identical)
            wait_queued(identical)
            # Queued behind at least one identical request: in arrival order it comes later.
            (different,) = _post_together(pool, trainer, [(path, other)], [key])
            wait_queued(identical + 1)
        responses = [f.result(timeout=DEADLINE) for f in same]
        conflict = different.result(timeout=DEADLINE)
    assert _batches() == (batches + 2, admissions + 1 + identical + 1)

    assert [r.status_code for r in responses] == [201] * identical, [r.text for r in responses]
    first = responses[0].json()
    assert all(r.json() == first for r in responses)  # the noise drawn once, for everyone
    replayed = [r.headers.get(REPLAYED) for r in responses]
    assert (replayed.count(None), replayed.count("true")) == (1, identical - 1), replayed
    assert conflict.status_code == 422, conflict.text
    assert conflict.json()["code"] == "idempotency_conflict"
    assert REPLAYED not in conflict.headers

    entries = _assert_consistent(api, database, dataset_id)
    (charge,) = entries[len(before) :]
    assert (charge["kind"], charge["idempotency_key"]) == ("charge", key)
    assert (charge["seq"], charge["release_id"]) == (first["ledger_seq"], first["id"])
    assert api.get(f"/v1/datasets/{dataset_id}").json()["epsilon_spent"] == 0.5
    # Later, the key still replays that answer and still refuses the other body.
    again = trainer.post(path, body, headers={"Idempotency-Key": key})
    assert (again.status_code, again.json(), again.headers.get(REPLAYED)) == (201, first, "true")
    assert trainer.post(path, other, headers={"Idempotency-Key": key}).status_code == 422
    assert _entries(api, dataset_id) == entries


def test_a_failed_decision_stays_with_its_admission(api: Api, database: Database) -> None:
    """An unexpected error in one decision rolls the batch back; the others are decided again
    and admitted once each, and only that one fails."""
    dataset_id = "isolated"
    api.create_dataset(dataset_id, 10.0)
    trainer = api.as_key(api.new_key("trainer", [dataset_id]))
    pipeline, path = _pipeline(api), f"/v1/datasets/{dataset_id}/releases"

    def broken(_session: Session, _dataset: Dataset | None) -> None:
        raise RuntimeError("a bug in one decision")

    with ThreadPoolExecutor(max_workers=4) as pool:
        with lane_held(pipeline, dataset_id) as wait_queued:
            sent = [pool.submit(trainer.post, path, TENTH) for _ in range(3)]
            wait_queued(3)
            failing = pool.submit(pipeline.submit, Admission(broken, dataset_id=dataset_id))
            wait_queued(4)
        answers = [f.result(timeout=DEADLINE) for f in sent]
        with pytest.raises(RuntimeError, match="a bug in one decision"):
            failing.result(timeout=DEADLINE)
    assert [a.status_code for a in answers] == [201] * 3, [a.text for a in answers]
    charges = [e for e in _assert_consistent(api, database, dataset_id) if e["kind"] == "charge"]
    assert sorted(e["seq"] for e in charges) == sorted(a.json()["ledger_seq"] for a in answers)


def test_a_commit_that_fails_is_never_decided_again(
    api: Api, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit may land and still report an error (the connection lost after COMMIT): the
    batch is not decided again, so requests without a key are never charged twice."""
    dataset_id = "lost"
    api.create_dataset(dataset_id, 10.0)
    trainer = api.as_key(api.new_key("trainer", [dataset_id]))
    pipeline, path = _pipeline(api), f"/v1/datasets/{dataset_id}/releases"
    real_write = pipeline.db.write

    @contextmanager
    def landed_then_lost() -> Iterator[Session]:
        with real_write() as session:
            yield session
        raise OperationalError("COMMIT", {}, ConnectionError("connection lost after COMMIT"))

    with ThreadPoolExecutor(max_workers=3) as pool:
        with lane_held(pipeline, dataset_id) as wait_queued:
            sent = [pool.submit(trainer.post, path, TENTH) for _ in range(3)]
            wait_queued(3)
            monkeypatch.setattr(pipeline.db, "write", landed_then_lost)
        answers = [f.result(timeout=DEADLINE) for f in sent]
    monkeypatch.undo()
    assert [a.status_code for a in answers] == [503] * 3, [a.text for a in answers]
    charges = [e for e in _assert_consistent(api, database, dataset_id) if e["kind"] == "charge"]
    assert len(charges) == 3  # committed once, answered with an error, never decided again


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_batch_searches_indexes_only(api: Api) -> None:
    """No statement of a batch scans a table that grows with the history.

    SQLite's plans do not depend on table statistics, so the plan of each statement a batch
    of keyed admissions sent (replayed with its own parameters) shows it: a row-value IN list
    over the idempotency records' keys once made SQLite scan that whole table every batch.
    """
    dataset_id = "indexed"
    api.create_dataset(dataset_id, 10.0)
    trainer = api.as_key(api.new_key("trainer", [dataset_id]))
    database: Database = api.client.app.state.db  # type: ignore[union-attr]
    path, keys = f"/v1/datasets/{dataset_id}/releases", ["k1", "k2", "k3"]
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    with ThreadPoolExecutor(max_workers=len(keys)) as pool:
        with lane_held(_pipeline(api), dataset_id) as wait_queued:
            answers = _post_together(pool, trainer, [(path, TENTH)] * len(keys), keys)
            wait_queued(len(keys))
            event.listen(database.write_engine, "before_cursor_execute", record)
        assert [a.result(timeout=DEADLINE).status_code for a in answers] == [201] * len(keys)
    event.remove(database.write_engine, "before_cursor_execute", record)
    looked_up = [p for s, p in sent if "FROM idempotency_records" in s]
    assert len(looked_up) == 1 and len(looked_up[0]) == 2 * len(keys)  # one lookup, every key
    with database.write_engine.connect() as connection:
        for statement, parameters in sent:
            plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            details = [row[3] for row in plan]
            scans = [d for d in details if d.startswith("SCAN") and "CONSTANT ROW" not in d]
            assert not scans, (statement, details)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_dataset_held_elsewhere_waits_alone(api: Api, database: Database) -> None:
    """A batch takes the datasets no other transaction holds (SKIP LOCKED): an admission whose
    dataset another process holds is put back, does not hold up the rest of its batch, and is
    decided once its dataset is free (its next batch waits for the lock)."""
    for dataset_id in ("held", "free"):
        api.create_dataset(dataset_id, 10.0)
    trainer = api.as_key(api.new_key("trainer", ["held", "free"]))
    pipeline = _pipeline(api)
    batches, admissions = _batches()
    with ThreadPoolExecutor(max_workers=2) as pool:
        with database.write() as elsewhere:  # another process's transaction on "held"
            assert database.lock_dataset(elsewhere, "held") is not None
            with lane_held(pipeline, "free") as wait_queued:
                waiting = pool.submit(trainer.post, "/v1/datasets/held/releases", TENTH)
                wait_queued(1)
                passing = pool.submit(trainer.post, "/v1/datasets/free/releases", TENTH)
                wait_queued(2)
            assert passing.result(timeout=DEADLINE).status_code == 201
            assert not waiting.done()  # put back, now waiting for the lock held here
            deadline = time.monotonic() + DEADLINE
            while _queued(pipeline) or _batches()[1] < admissions + 2:
                assert time.monotonic() < deadline, "the put-back admission never led a batch"
                time.sleep(0.005)
            assert not waiting.done()
        answer = waiting.result(timeout=DEADLINE)  # the lock is free: decided now
    assert answer.status_code == 201, answer.text
    # The holder's batch, the batch that put "held" back, then "held" alone.
    assert _batches() == (batches + 3, admissions + 3)
    for dataset_id in ("held", "free"):
        charges = [
            e for e in _assert_consistent(api, database, dataset_id) if e["kind"] == "charge"
        ]
        assert len(charges) == 1


def test_admissions_queued_while_a_batch_awaits_its_lock_join_it(
    api: Api, database: Database
) -> None:
    """A batch waiting for its dataset's lock (held by another process) takes, once it holds
    it, the admissions of that dataset that queued meanwhile: they are decided in this turn of
    the lock, not the next. PostgreSQL: the first batch puts the admission back (SKIP LOCKED),
    the next waits for the lock; SQLite: the batch waits for the database's write lock."""
    api.create_dataset("turns", 10.0)
    trainer = api.as_key(api.new_key("trainer", ["turns"]))
    pipeline = _pipeline(api)
    path = "/v1/datasets/turns/releases"
    batches, admissions = _batches()
    locks = _lock_waits()
    put_back = 0 if database.is_sqlite else 1  # PostgreSQL's SKIP LOCKED batch, of none

    def awaiting_lock() -> bool:
        with pipeline._mutex:
            idle = pipeline._lane.busy and not pipeline._lane.waiting
        return idle and _lock_waits() == locks + put_back

    with ThreadPoolExecutor(max_workers=3) as pool:
        with database.write() as elsewhere:  # another process's transaction on "turns"
            assert database.lock_dataset(elsewhere, "turns") is not None
            first = pool.submit(trainer.post, path, TENTH)
            deadline = time.monotonic() + DEADLINE
            while not awaiting_lock():
                assert time.monotonic() < deadline, "the first admission never awaited the lock"
                time.sleep(0.005)
            time.sleep(0.2)  # its batch is taken and waits for the lock: nothing moves now
            assert awaiting_lock() and not first.done()
            later = [pool.submit(trainer.post, path, TENTH) for _ in range(2)]
            deadline = time.monotonic() + DEADLINE
            while _queued(pipeline) < 2:
                assert time.monotonic() < deadline, f"{_queued(pipeline)} of 2 queued"
                time.sleep(0.005)
        answers = [f.result(timeout=DEADLINE) for f in (first, *later)]
    assert [a.status_code for a in answers] == [201] * 3, [a.text for a in answers]
    # One batch decided all three (on PostgreSQL, after one that put the first back and, having
    # decided none, is not counted as a batch).
    assert _batches() == (batches + 1, admissions + 3)
    assert _lock_waits() == locks + put_back + 1
    charges = [e for e in _assert_consistent(api, database, "turns") if e["kind"] == "charge"]
    assert len(charges) == 3


def test_coroutines_and_threads_share_batches(api: Api) -> None:
    """Coroutines (`submit_async`, as the routes submit) and threads (`submit`) queue on one
    lane and are decided in the same batches, each getting its own result or refusal; the
    lead passes between a thread and the pipeline's leader thread both ways; a coroutine
    cancelled while it waits is still decided, as a thread's request would be."""
    api.create_dataset("mixed", 10.0)
    pipeline = _pipeline(api)
    decided: list[str] = []

    def admission(name: str) -> Admission[str]:
        def decide(_session: Session, dataset: Dataset | None) -> str:
            assert dataset is not None and dataset.id == "mixed"
            decided.append(name)
            if name.endswith("refused"):
                raise NotFound(f"{name} is refused")
            return f"{name} decided"

        return Admission(decide, dataset_id="mixed")

    async def awaited(name: str) -> object:
        decision = await pipeline.submit_async(admission(name))
        return decision

    async def together(names: list[str]) -> list[object]:
        return await asyncio.gather(*(awaited(n) for n in names), return_exceptions=True)

    async def cancelled_while_queued(wait_queued: Callable[[int], None]) -> None:
        waiting = asyncio.ensure_future(awaited("abandoned"))
        await asyncio.to_thread(wait_queued, 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    names = [f"coroutine {i}" for i in range(6)] + ["coroutine refused"]
    batches, admissions = _batches()
    with ThreadPoolExecutor(max_workers=2) as pool:
        with lane_held(pipeline, "mixed") as wait_queued:
            gathered = pool.submit(asyncio.run, together(names))
            wait_queued(len(names))
            threaded = pool.submit(pipeline.submit, admission("thread"))
            wait_queued(len(names) + 1)
        results = gathered.result(timeout=DEADLINE)
        assert threaded.result(timeout=DEADLINE) == "thread decided"
    assert results[:-1] == [f"{n} decided" for n in names[:-1]]
    assert isinstance(results[-1], NotFound)
    assert decided == [*names, "thread"]  # in arrival order, in the batch after the holder's
    assert _batches() == (batches + 2, admissions + 1 + len(names) + 1)

    # A thread leads, a coroutine follows it (and the leader thread leads for it), and back.
    with ThreadPoolExecutor(max_workers=1) as pool, lane_held(pipeline, "mixed") as wait_queued:
        abandoned = pool.submit(asyncio.run, cancelled_while_queued(wait_queued))
        abandoned.result(timeout=DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while "abandoned" not in decided:
        assert time.monotonic() < deadline, "the cancelled coroutine's admission was dropped"
        time.sleep(0.005)
    assert pipeline.submit(admission("after")) == "after decided"
    assert asyncio.run(awaited("last")) == "last decided"


# -- live servers -----------------------------------------------------------------------------


ServerFactory = Callable[[], Servers]


@pytest.fixture
def start_server(migrated_url: str, tmp_path: Path) -> Iterator[ServerFactory]:
    """Start a `privacy-ledger serve` (one worker, its own process group) on the test database;
    every one still running is stopped at the end."""
    started: list[Servers] = []

    def start() -> Servers:
        server = Servers(migrated_url, tmp_path)
        started.append(server)
        server.start(1)
        return server

    yield start
    for server in started:
        server.stop()


def _url(server: Servers) -> str:
    return server.current()[1]


def _batch_sizes(base_url: str) -> tuple[float, float]:
    """(batches, admissions in them) a live server has counted, from its /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=TIMEOUT).text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    samples = dict(line.split(" ", 1) for line in lines)
    return float(samples["ledger_batch_size_count"]), float(samples["ledger_batch_size_sum"])


# -- 3. kill -9 while combined commits are in flight ------------------------------------------


KILL_CLIENTS = 12
KILL_AFTER = 40  # acknowledged releases before the kill
MOST_PER_CLIENT = 150  # a bound: each client sends until the server dies
SMALL: dict[str, Any] = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.05}


@dataclass
class Sent:
    """One release a client began to send, and the answer it got (None: it got none)."""

    key: str
    started: float
    status: int | None = None
    answer: dict[str, Any] | None = None


class Clients:
    """Clients that each send releases with keys of their own until the server dies."""

    def __init__(self, base_url: str, bearer: str, path: str) -> None:
        self.base_url, self.bearer, self.path = base_url, bearer, path
        self.start = threading.Barrier(KILL_CLIENTS)
        self.enough = threading.Event()
        self._acknowledged = 0
        self._lock = threading.Lock()

    def send(self, client: int) -> list[Sent]:
        sent: list[Sent] = []
        with httpx.Client(base_url=self.base_url, timeout=TIMEOUT) as http:
            caller = Api(http, self.bearer)
            self.start.wait(timeout=DEADLINE)
            for number in range(MOST_PER_CLIENT):
                call = Sent(f"k9-{client}-{number}", time.monotonic())
                sent.append(call)
                headers = {"Idempotency-Key": call.key}
                try:
                    response = caller.post(self.path, SMALL, headers=headers)
                except httpx.TransportError:
                    return sent  # the server is gone: whether this one was committed is unknown
                call.status, call.answer = response.status_code, response.json()
                if response.status_code != 201:
                    return sent  # reported by the checks
                with self._lock:
                    self._acknowledged += 1
                    if self._acknowledged >= KILL_AFTER:
                        self.enough.set()
        return sent


def test_kill_9_during_combined_commits_loses_and_duplicates_nothing(
    start_server: ServerFactory, database: Database
) -> None:
    server = start_server()
    dataset_id = "killed"
    path = f"/v1/datasets/{dataset_id}/releases"
    with httpx.Client(base_url=_url(server), timeout=TIMEOUT) as http:
        admin = Api(http, ADMIN_KEY)
        admin.create_dataset(dataset_id, 100.0)  # room for all: 12 × 150 × 0.05 < 100
        bearer = admin.new_key("trainer", [dataset_id])

    clients = Clients(_url(server), bearer, path)
    with ThreadPoolExecutor(max_workers=KILL_CLIENTS) as pool:
        futures = [pool.submit(clients.send, i) for i in range(KILL_CLIENTS)]
        deadline = time.monotonic() + DEADLINE
        while not clients.enough.wait(0.05):
            assert not all(f.done() for f in futures), [f.result() for f in futures]
            assert time.monotonic() < deadline, "the kill point was never reached"
        batches, admissions = _batch_sizes(_url(server))
        kill_started = time.monotonic()
        server.kill()
        sent = [call for f in futures for call in f.result(timeout=DEADLINE)]
    # The server had been combining admissions, and requests were on their way when it died.
    assert admissions > batches, (batches, admissions)
    unanswered = [c for c in sent if c.status is None]
    failed = [(c.status, c.answer) for c in sent if c.status not in (None, 201)]
    assert not failed, failed
    in_flight = {c.key for c in unanswered if c.started < kill_started}
    assert in_flight, "no request was in flight when the server was killed"
    acknowledged = {c.key: c.answer for c in sent if c.answer is not None}

    server.start(1)
    with httpx.Client(base_url=_url(server), timeout=TIMEOUT) as http:
        admin, trainer = Api(http, ADMIN_KEY), Api(http, bearer)
        entries = _assert_consistent(admin, database, dataset_id)
        charges = [e for e in entries if e["kind"] == "charge"]
        present = Counter(e["idempotency_key"] for e in charges)
        # Every acknowledged release exactly once, as its answer named it; nothing twice; and
        # nothing but requests sent before the server died (some whose answer died with it).
        assert not [key for key, n in present.items() if n > 1], present.most_common(3)
        assert set(acknowledged) <= set(present)
        assert set(present) <= set(acknowledged) | {c.key for c in unanswered}
        by_key = {e["idempotency_key"]: e for e in charges}
        for key, answer in acknowledged.items():
            assert answer is not None
            entry = by_key[key]
            assert (entry["seq"], entry["release_id"]) == (answer["ledger_seq"], answer["id"])

        # Retrying every request with its key: the ones present replay, the rest are charged now.
        for call in sent:
            again = trainer.post(path, SMALL, headers={"Idempotency-Key": call.key})
            assert again.status_code == 201, again.text
            assert again.headers.get(REPLAYED) == ("true" if call.key in present else None)
            if call.answer is not None:
                assert again.json() == call.answer
        entries = _assert_consistent(admin, database, dataset_id)
    retried = Counter(e["idempotency_key"] for e in entries if e["kind"] == "charge")
    assert retried == Counter({c.key: 1 for c in sent})
    assert [e for e in entries if e["kind"] == "charge"][: len(charges)] == charges


# -- 4. two server processes on one PostgreSQL database ---------------------------------------


PER_SERVER_CLIENTS, PER_CLIENT = 8, 5  # 40 releases to each server


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_servers_on_one_database_never_overspend(
    start_server: ServerFactory, database: Database
) -> None:
    dataset_id, cap, fit = "contended", 1.0, 10
    servers = [start_server(), start_server()]
    urls = [_url(s) for s in servers]
    with httpx.Client(base_url=urls[0], timeout=TIMEOUT) as http:
        admin = Api(http, ADMIN_KEY)
        admin.create_dataset(dataset_id, cap)
        bearer = admin.new_key("trainer", [dataset_id])
    path = f"/v1/datasets/{dataset_id}/releases"
    clients = PER_SERVER_CLIENTS * len(urls)
    barrier = threading.Barrier(clients)

    def hammer(url: str) -> list[httpx.Response]:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            caller = Api(http, bearer)
            barrier.wait(timeout=DEADLINE)
            return [caller.post(path, TENTH) for _ in range(PER_CLIENT)]

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(hammer, urls[i % len(urls)]) for i in range(clients)]
        responses = [r for f in futures for r in f.result(timeout=DEADLINE)]

    outcomes = Counter((r.status_code, r.json().get("code")) for r in responses)
    assert outcomes == {(201, None): fit, (409, "budget_exhausted"): len(responses) - fit}
    admitted = [r.json() for r in responses if r.status_code == 201]
    for refused in (r.json() for r in responses if r.status_code == 409):
        assert refused["epsilon_after"] > cap >= refused["epsilon_spent"], refused

    with httpx.Client(base_url=urls[1], timeout=TIMEOUT) as http:
        entries = _assert_consistent(Api(http, ADMIN_KEY), database, dataset_id)
        dataset = Api(http, ADMIN_KEY).get(f"/v1/datasets/{dataset_id}").json()
    assert dataset["epsilon_spent"] == dataset["epsilon_reserved"] == cap
    charges = [e for e in entries if e["kind"] == "charge"]
    assert sorted((e["seq"], e["release_id"]) for e in charges) == sorted(
        (a["ledger_seq"], a["id"]) for a in admitted
    )
