"""kill -9 in the middle of traffic: after a restart and retries, the ledger is exactly what was
acknowledged.

Trainer threads run scripts (plan a run, reserve its epochs, make releases, complete the run),
every request with its own Idempotency-Key, against `privacy-ledger serve`. At a seeded random
point (after the k-th acknowledged response) the server's whole process group gets SIGKILL: the
requests in flight then may or may not have been committed. A new server starts on the same
database; every client retries the request whose outcome it did not see (same key, same body)
until it gets an answer, and finishes its script. Three kills per backend (one of them of a
two-worker server), then: each acknowledged request is in the ledger exactly once (matched by
idempotency key, run id, release id and ledger_seq), nothing else is, the chain verifies, and the
cached curves equal both the server's replay and one recomputed here from the entries' units and
from the accountant alone.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from accountant import Filter, exact
from accountant.mechanisms import Gaussian, Laplace, SubsampledGaussian
from service.storage.database import Database
from service.storage.models import IdempotencyRecord
from tests.service.conftest import ADMIN_KEY, ROOT, Api, cached_budget, free_port, replay_units

SEED = 20261123
# Workers of each server in turn: the first three are killed, the last one is checked.
SERVER_WORKERS = (1, 2, 1, 1)
THREADS = 6
DATASET, CAP, DELTA = "crashy", 1000.0, 1e-5
PLAN: dict[str, Any] = {
    "sample_rate": 0.01,
    "steps_per_epoch": 20,
    "epochs": 3,
    "noise_multiplier": 1.0,
}
LAPLACE: dict[str, Any] = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.05}
GAUSSIAN: dict[str, Any] = {"mechanism": "gaussian", "sensitivity": 1.0, "noise_scale": 4.0}
# One thread's script: (action, body); the run's id fills in the paths as it becomes known.
SCRIPT: list[tuple[str, dict[str, Any] | None]] = [
    ("plan", PLAN),
    ("epoch", None),
    ("release", LAPLACE),
    ("epoch", None),
    ("release", GAUSSIAN),
    ("epoch", None),
    ("complete", None),
]
SUCCESS = {"plan": 201, "epoch": 201, "release": 201, "complete": 200}
TIMEOUT = 30.0
DEADLINE = 120.0


class Servers:
    """`privacy-ledger serve` processes on one database, one after another, each in its own
    process group (so SIGKILL reaches the uvicorn workers too)."""

    def __init__(self, database_url: str, logs: Path) -> None:
        self.database_url = database_url
        self.logs = logs
        self.generation = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._changed = threading.Condition()
        self._ports: set[int] = set()

    def start(self, workers: int) -> None:
        """Start the next server and wait until it is ready; clients waiting for it resume."""
        port = free_port()
        while port in self._ports:  # a client must never reach a new server at a dead address
            port = free_port()
        self._ports.add(port)
        env = {
            **os.environ,
            "LEDGER_DATABASE_URL": self.database_url,
            "LEDGER_ADMIN_KEY": ADMIN_KEY,
            "LEDGER_LOG_LEVEL": "warning",
        }
        if workers > 1:
            metrics = self.logs / f"metrics-{port}"
            metrics.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        log_path = self.logs / f"server-{port}.log"
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*command, "--workers", str(workers)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.process = process
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log_path.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready within 60 s")
            time.sleep(0.05)
        with self._changed:
            self.generation += 1
            self.url = url
            self._changed.notify_all()

    def current(self) -> tuple[int, str]:
        with self._changed:
            return self.generation, self.url

    def newer_than(self, generation: int) -> tuple[int, str]:
        """The first server started after `generation` (waits for it)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.generation > generation, DEADLINE):
                raise TimeoutError("no server was restarted")
            return self.generation, self.url

    def kill(self) -> None:
        """SIGKILL the running server's whole process group; return once every member is gone."""
        process = self.process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 30
        while _live_members(process.pid):
            assert time.monotonic() < deadline, "the killed server's workers are still running"
            time.sleep(0.02)
        self.process = None

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.process = None


def _live_members(group: int) -> bool:
    """Whether a process of this group is still running (zombies awaiting a reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its last ')'.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state not in ("Z", "X"):
            return True
    return False


@pytest.fixture
def servers(migrated_url: str, tmp_path: Path) -> Iterator[Servers]:
    manager = Servers(migrated_url, tmp_path)
    yield manager
    manager.stop()


class KillSwitch:
    """Fires at the k-th acknowledged response (or the first after it that is not a script's
    last). The thread whose answer fired it sends its next request and never reads the answer:
    the server is killed once that request is committed, so its outcome is lost with the crash."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.fired = threading.Event()
        self.killed = threading.Event()
        self.lost_key = ""
        self._acknowledged = 0
        self._lock = threading.Lock()

    def acknowledged(self, last: bool) -> bool:
        """Count an answer; True if the caller is to lose its next one."""
        with self._lock:
            self._acknowledged += 1
            if self._acknowledged < self.after or last or self.lost_key:
                return False
            self.lost_key = "pending"
            return True

    def lose(self, idempotency_key: str) -> None:
        """The request with this key is on its way: kill the server once it is committed."""
        self.lost_key = idempotency_key
        self.fired.set()
        assert self.killed.wait(DEADLINE), "the server was not killed"


@dataclass
class Call:
    """One request of a script and the answer it finally got."""

    action: str
    idempotency_key: str
    path: str
    body: dict[str, Any] | None
    status: int = 0
    answer: Any = None
    unseen: int = 0  # attempts whose outcome the client never saw
    replayed: bool = False
    server_errors: list[str] = field(default_factory=list)


class Trainer:
    """One client: its script, sent to whichever server it last knew, retried across crashes."""

    def __init__(self, servers: Servers, bearer: str, switch: KillSwitch) -> None:
        self.servers = servers
        self.bearer = bearer
        self.switch = switch
        self.generation, self.url = servers.current()
        self.calls: list[Call] = []
        self.lose_next = False

    def run(self) -> list[Call]:
        run_id = ""
        with httpx.Client(timeout=TIMEOUT) as http:
            for action, body in SCRIPT:
                path = {
                    "plan": f"/v1/datasets/{DATASET}/runs",
                    "epoch": f"/v1/runs/{run_id}/epochs",
                    "release": f"/v1/datasets/{DATASET}/releases",
                    "complete": f"/v1/runs/{run_id}/complete",
                }[action]
                call = Call(action, f"crash-{uuid.uuid4().hex}", path, body)
                self.calls.append(call)
                self._send(http, call, last=action == "complete")
                if call.status != SUCCESS[action]:
                    break  # the checks report it; the rest of the script depends on it
                if action == "plan":
                    run_id = call.answer["id"]
        return self.calls

    def _send(self, http: httpx.Client, call: Call, *, last: bool) -> None:
        headers = {
            "Authorization": f"Bearer {self.bearer}",
            "Idempotency-Key": call.idempotency_key,
        }
        deadline = time.monotonic() + DEADLINE
        if self.lose_next:
            self.lose_next = False
            self._lose_answer(call)
            self.generation, self.url = self.servers.newer_than(self.generation)
        while True:
            assert time.monotonic() < deadline, f"no answer to {call.action} {call.path}"
            try:
                response = http.post(self.url + call.path, json=call.body, headers=headers)
            except httpx.TransportError:
                # Sent or not, committed or not: unknown. Find the restarted server, send again.
                call.unseen += 1
                self.generation, self.url = self.servers.newer_than(self.generation)
                continue
            if response.status_code >= 500:  # retryable, but no crash excuses one: reported below
                call.server_errors.append(response.text)
                time.sleep(0.1)
                continue
            call.status = response.status_code
            call.answer = response.json()
            call.replayed = response.headers.get("Idempotent-Replayed") == "true"
            self.lose_next = self.switch.acknowledged(last)
            return

    def _lose_answer(self, call: Call) -> None:
        """Send the request on a plain socket and never read the answer."""
        payload = json.dumps(call.body).encode() if call.body is not None else b""
        address = self.url.removeprefix("http://")
        head = (
            f"POST {call.path} HTTP/1.1\r\nHost: {address}\r\n"
            f"Authorization: Bearer {self.bearer}\r\nIdempotency-Key: {call.idempotency_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n"
        )
        host, port = address.split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as connection:
            connection.sendall(head.encode() + payload)
            self.switch.lose(call.idempotency_key)
        call.unseen += 1


def _committed(database: Database, idempotency_key: str) -> bool:
    with database.read() as session:
        statement = select(IdempotencyRecord.key).where(IdempotencyRecord.key == idempotency_key)
        return session.execute(statement).first() is not None


def _crash_round(
    servers: Servers, database: Database, bearer: str, kill_after: int, next_workers: int
) -> tuple[list[Call], str]:
    """Run every thread's script; kill the server after `kill_after` answers and restart it.

    Returns every call and the key of the request whose committed answer was lost.
    """
    switch = KillSwitch(kill_after)
    trainers = [Trainer(servers, bearer, switch) for _ in range(THREADS)]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures: list[Future[list[Call]]] = [pool.submit(t.run) for t in trainers]
        deadline = time.monotonic() + DEADLINE
        while not switch.fired.wait(0.05):
            if all(f.done() for f in futures):
                for f in futures:
                    f.result()  # a failed thread's exception, if any
                raise AssertionError("every script ended before the kill point")
            assert time.monotonic() < deadline, "the kill point was never reached"
        while not _committed(database, switch.lost_key):
            assert time.monotonic() < deadline, "the request to lose was never committed"
            time.sleep(0.01)
        servers.kill()
        switch.killed.set()
        servers.start(next_workers)
        return [call for f in futures for call in f.result(timeout=DEADLINE)], switch.lost_key


def _check_ledger(admin: Api, database: Database, calls: list[Call]) -> None:
    """The ledger holds exactly the acknowledged requests, verifies, and replays to the cache."""
    failed = [(c.action, c.status, c.answer, c.server_errors) for c in calls if c.server_errors]
    assert not failed, f"5xx answers: {failed}"
    refused = [(c.action, c.status, c.answer) for c in calls if c.status != SUCCESS[c.action]]
    assert not refused, refused

    export = admin.get(f"/v1/datasets/{DATASET}/ledger", params={"format": "export"})
    assert export.status_code == 200, export.text
    entries: list[dict[str, Any]] = export.json()["data"]
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert entries[0]["kind"] == "dataset_created"
    written = entries[1:]

    # One entry per acknowledged request, no more: matched by the request's idempotency key.
    keys = Counter(e["idempotency_key"] for e in written)
    duplicated = {key: n for key, n in keys.items() if n != 1}
    assert not duplicated, f"written more than once: {duplicated}"
    assert set(keys) == {c.idempotency_key for c in calls}
    by_key = {e["idempotency_key"]: e for e in written}
    assert len(written) == len(calls)
    charges = [e for e in written if e["kind"] == "charge"]
    assert len(charges) == sum(c.action in ("epoch", "release") for c in calls)

    # ... and each is the entry its answer names.
    for call in calls:
        entry, answer = by_key[call.idempotency_key], call.answer
        if call.action == "plan":
            assert (entry["kind"], entry["run_id"]) == ("hold", answer["id"])
        elif call.action == "epoch":
            assert entry["seq"] == answer["ledger_seq"]
            assert (entry["kind"], entry["run_id"]) == ("charge", answer["run_id"])
            assert entry["details"] == {"epoch": answer["epoch"], "from_hold": True}
        elif call.action == "release":
            assert entry["seq"] == answer["ledger_seq"]
            assert (entry["kind"], entry["release_id"]) == ("charge", answer["id"])
        else:
            assert (entry["kind"], entry["run_id"]) == ("release_hold", answer["id"])
            assert entry["details"] == {"reason": "completed", "epochs_released": 0}
    # Every run charged epochs 1, 2, 3 once each and was completed.
    epochs_by_run = Counter(
        (c.answer["run_id"], c.answer["epoch"]) for c in calls if c.action == "epoch"
    )
    runs = {c.answer["id"] for c in calls if c.action == "plan"}
    assert set(epochs_by_run) == {(r, n) for r in runs for n in range(1, PLAN["epochs"] + 1)}
    listed = admin.get(f"/v1/datasets/{DATASET}/runs", params={"limit": 1000}).json()["data"]
    assert {r["id"]: (r["status"], r["epochs_charged"]) for r in listed} == {
        r: ("completed", PLAN["epochs"]) for r in runs
    }

    verified = admin.get(f"/v1/datasets/{DATASET}/ledger/verify").json()
    assert verified["problems"] == []
    assert verified["ok"] and verified["chain_ok"] and verified["replay_ok"]
    assert verified["entries"] == verified["last_seq"] == len(entries)

    # Independently: replay the entries' units by kind, and compare with the cached curves.
    budget = cached_budget(database, DATASET)
    orders = budget.orders
    zero = [0] * len(orders)
    posted, pending = replay_units(entries, len(orders))
    assert budget.posted == posted
    assert budget.pending == pending == zero
    # ... and with what the acknowledged requests cost, from the accountant alone.
    epoch_units = exact.to_units(
        SubsampledGaussian(
            PLAN["sample_rate"], PLAN["noise_multiplier"], PLAN["steps_per_epoch"]
        ).rdp(orders)
    )
    laplace_units = exact.to_units(Laplace(1.0 / LAPLACE["epsilon"]).rdp(orders))
    gaussian_units = exact.to_units(Gaussian(GAUSSIAN["noise_scale"]).rdp(orders))
    expected = list(zero)
    for call in calls:
        if call.action == "epoch":
            expected = exact.add(expected, epoch_units)
        elif call.action == "release":
            mechanism_units = laplace_units if call.body == LAPLACE else gaussian_units
            expected = exact.add(expected, mechanism_units)
    assert posted == expected
    dataset = admin.get(f"/v1/datasets/{DATASET}").json()
    assert dataset["epsilon_spent"] == Filter(CAP, DELTA, orders).epsilon(exact.to_curve(posted))


def test_kill_9_mid_traffic_loses_and_duplicates_nothing(
    servers: Servers, database: Database, database_url: str
) -> None:
    rng = random.Random(f"{SEED}:{database_url.split(':')[0]}")
    servers.start(SERVER_WORKERS[0])
    _, url = servers.current()
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        admin = Api(http, ADMIN_KEY)
        admin.create_dataset(DATASET, CAP, DELTA, shares={"profile": "uniform"})  # figures: Filter
        bearer = admin.new_key("trainer", [DATASET])

    calls: list[Call] = []
    per_round = THREADS * len(SCRIPT)
    for workers in SERVER_WORKERS[1:]:
        kill_after = rng.randint(per_round // 5, 3 * per_round // 4)
        round_calls, lost_key = _crash_round(servers, database, bearer, kill_after, workers)
        # The request committed just before the kill was answered on retry from its record ...
        (lost,) = [c for c in round_calls if c.idempotency_key == lost_key]
        assert (lost.unseen, lost.replayed) == (1, True)
        # ... and only requests retried after the crash were replays.
        assert all(c.unseen for c in round_calls if c.replayed)
        calls += round_calls
        _, url = servers.current()
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            _check_ledger(Api(http, ADMIN_KEY), database, calls)
