"""Load: real HTTP against `privacy-ledger serve`, beside the framework's and database's ceilings.

    .venv/bin/python -m bench.load [--backend sqlite|postgres|both] [--workers 1,2]
        [--clients 8,32,64] [--datasets 1,16] [--duration S] [--growth/--no-growth]
        [--quick] [--markdown]

For each backend × workers × datasets × clients it starts `privacy-ledger serve` on a free
loopback port and a fresh database (a temp SQLite file, or a PostgreSQL database created and
dropped here), creates the datasets (cap ε=10⁴, so refusals are rare) and a trainer key, and
runs N simulated trainers, each on its own keep-alive connection, doing the trainer mix in a
loop: plan a run (target ε), reserve its epochs, make two releases (Gaussian and Laplace),
complete the run. Every POST carries a fresh Idempotency-Key; a request whose connection breaks
is sent again with the same key. After a warm-up, a fixed window is measured.

An *admission* is an admitted plan, epoch or release (a 201). Per configuration it prints
admissions/s and p50/p95/p99 latency of admission requests (both over the window); 409
refusals, 5xx and other failures (over the whole run, warm-up included); the CPU used by the
client, the server's process group and the whole machine (cores, over the window); and the
overspend check: every dataset's chain verifies (`GET …/ledger/verify`), no entry reports ε
above the cap, and the admitted plans, charges (epochs + releases) and completions equal the
ledger's `hold`, `charge` and `release_hold` entries.

Ceilings, measured in the same run, each figure also printed as a ratio to them:
- framework: `null_app` below (one FastAPI endpoint that does nothing, sync like ours), served
  by uvicorn with the same worker count and driven by the same client code;
- database (PostgreSQL only): `pgbench` with one UPDATE of one row, as many clients, in a
  throwaway database. An admission locks and updates one dataset row, so this bounds the
  admissions/s of one dataset; the ratio uses admissions/s although the mix also spends a
  transaction on each completion (1 in 14 requests).

Growth: epoch admission latency and the server's CPU per admission (one client, sequential)
with 100, 10,000 and 100,000 existing ledger entries on the dataset. The history is written
in-process through the service's own domain layer (`service.domain.runs` and `releases`, the
same calls the routes make), so the chain, cached curves and idempotency records are as the
server would have written them; only durability is relaxed while seeding (no fsync per commit;
the server's connections keep theirs). The server is restarted on that database for each size;
the chain is verified at the end.

The client is a few lines of asyncio (uvloop) rather than httpx: on a 2-core box httpx's
AsyncClient costs about 1.4 ms of CPU per request, enough to starve the server; this client
costs about 40 µs. Linux only (/proc for CPU figures).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import re
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from accountant import calibrate
from service.api import render
from service.domain import datasets, keys, releases, runs
from service.domain.transactions import Idempotency, Outcome
from service.storage import migrate
from service.storage.database import Database

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = f"bench-admin-{secrets.token_hex(16)}"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

EPSILON_CAP = 1e4  # the schema's largest cap: ~10⁵ mix cycles fit, so refusals are rare
DELTA = 1e-5
SAMPLE_RATE, STEPS_PER_EPOCH, EPOCHS, TARGET_EPSILON = 0.01, 100, 10, 1.0
RELEASES = (("gaussian", 0.05, 1e-7), ("laplace", 0.05, None))  # (mechanism, ε, δ)

REQUEST_TIMEOUT_S = 60.0
ATTEMPTS = 3  # a request whose connection breaks is sent again, with the same key
NO_ANSWER = 0  # the status recorded when every attempt failed
READY_TIMEOUT_S = 120.0

GOAL_ADMISSIONS_PER_S = 1000.0
GOAL_P99_MS = 50.0
GOAL_P99_CLIENTS = 64
GOAL_GROWTH_RATIO = 1.10

_CLOCK_TICK = os.sysconf("SC_CLK_TCK")
_ADMISSIONS = ("plan", "epoch", "release")


def null_app() -> FastAPI:
    """The framework's ceiling: every POST (and GET) answered at once with a fixed body.

    The endpoint is a plain `def`, as ours are, so it pays the same hop to the thread pool.
    Its body carries an `id`, so the trainer mix runs against it unchanged.
    """
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    def nothing(path: str) -> JSONResponse:
        return JSONResponse({"id": "run_null"}, status_code=201)

    return app


# -- the client ---------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection to the server, as one trainer process holds."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self._head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """POST with a fresh Idempotency-Key: (status, body), or (NO_ANSWER, b"") on failure.

        A broken or timed-out connection is reopened and the same request, with the same key,
        sent again (the server then replays its first answer instead of charging twice).
        """
        content_type = "Content-Type: application/json\r\n" if body else ""
        request = (
            f"POST {path} HTTP/1.1\r\n{self._head}Idempotency-Key: {uuid.uuid4()}\r\n"
            f"{content_type}Content-Length: {len(body)}\r\n\r\n"
        ).encode("ascii") + body
        for _ in range(ATTEMPTS):
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    return await self._exchange(request)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                self.close()
        return NO_ANSWER, b""

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET once (no retries: the load drives POSTs; bench/cost.py times reads too)."""
        return await self._exchange(f"GET {path} HTTP/1.1\r\n{self._head}\r\n".encode("ascii"))

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(request)
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length, keep_alive = 0, True
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                keep_alive = value.strip().lower() != "close"
            elif name == "transfer-encoding":
                raise ValueError("a chunked answer: no endpoint driven here streams")
        body = await self._reader.readexactly(length)
        if not keep_alive:
            self.close()
        return status, body

    def close(self) -> None:
        """Drop the socket (the next request opens a new one)."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass(frozen=True)
class Clock:
    """A run's phases on the perf_counter clock: warm-up, then the measured window."""

    window_start: float
    window_end: float

    @classmethod
    def starting_now(cls, warmup: float, duration: float) -> Clock:
        """Warm-up from now, then the window."""
        start = time.perf_counter() + warmup
        return cls(start, start + duration)

    def running(self) -> bool:
        """Whether new requests may still start."""
        return time.perf_counter() < self.window_end

    def inside(self, moment: float) -> bool:
        """Whether a request that ended at `moment` counts toward the window's figures."""
        return self.window_start <= moment <= self.window_end


@dataclass(frozen=True)
class Cpu:
    """CPU used over the window, in cores: the client, the server's process group, the machine."""

    client: float
    server: float
    machine: float


@dataclass(frozen=True)
class Load:
    """What one load run measured."""

    seconds: float
    admitted: int  # in the window
    latencies: list[float]  # seconds, of admission requests that ended in the window
    refused: int  # 409s, whole run
    server_errors: int  # 5xx, whole run
    failures: int  # other 4xx and unanswered requests, whole run
    plans: int  # admitted plans, whole run (= hold entries)
    charges: int  # admitted epochs and releases, whole run (= charge entries)
    completions: int  # completed runs, whole run (= release_hold entries)
    cpu: Cpu

    @property
    def rate(self) -> float:
        """Admissions per second over the window."""
        return self.admitted / self.seconds

    def percentile_ms(self, percent: int) -> float:
        """A latency percentile in milliseconds (NaN when too few requests ended in the window)."""
        if len(self.latencies) < 2:
            return math.nan
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[percent - 1] * 1e3


@dataclass
class Tally:
    """Counts and latencies of one run, shared by its simulated trainers (one event loop)."""

    clock: Clock
    latencies: list[float] = field(default_factory=list)
    admitted_in_window: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, status: int, started: float, ended: float) -> None:
        """Count one answered (or unanswered) request of `kind`."""
        inside = self.clock.inside(ended)
        if kind in _ADMISSIONS:
            if inside:
                self.latencies.append(ended - started)
            if status == 201:
                self.outcomes["plan" if kind == "plan" else "charge"] += 1
                if inside:
                    self.admitted_in_window += 1
        elif 200 <= status < 300:
            self.outcomes["completion"] += 1
        if status == 409:
            self.outcomes["refused"] += 1
        elif status >= 500:
            self.outcomes["server_error"] += 1
        elif status == NO_ANSWER or status >= 400:
            self.outcomes["failure"] += 1

    def load(self, cpu: Cpu) -> Load:
        """The run's figures."""
        return Load(
            seconds=self.clock.window_end - self.clock.window_start,
            admitted=self.admitted_in_window,
            latencies=self.latencies,
            refused=self.outcomes["refused"],
            server_errors=self.outcomes["server_error"],
            failures=self.outcomes["failure"],
            plans=self.outcomes["plan"],
            charges=self.outcomes["charge"],
            completions=self.outcomes["completion"],
            cpu=cpu,
        )


@dataclass(frozen=True)
class Mix:
    """The trainer mix's request bodies, encoded once."""

    plan: bytes
    releases: tuple[bytes, ...]

    @classmethod
    def default(cls) -> Mix:
        """The mix this benchmark drives (see the module's constants)."""
        plan = {
            "sample_rate": SAMPLE_RATE,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "epochs": EPOCHS,
            "target_epsilon": TARGET_EPSILON,
            "max_grad_norm": 1.0,
            "name": "bench-load",
        }
        bodies = []
        for mechanism, epsilon, delta in RELEASES:
            body: dict[str, Any] = {"mechanism": mechanism, "epsilon": epsilon}
            if delta is not None:
                body["delta"] = delta
            bodies.append(json.dumps(body).encode())
        return cls(json.dumps(plan).encode(), tuple(bodies))


class Trainer:
    """One simulated trainer: the mix in a loop, rotating over the datasets."""

    def __init__(
        self, index: int, connection: Connection, dataset_ids: Sequence[str], mix: Mix, tally: Tally
    ) -> None:
        self.index = index
        self.connection = connection
        self.dataset_ids = dataset_ids
        self.mix = mix
        self.tally = tally

    async def _call(self, kind: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        started = time.perf_counter()
        status, answer = await self.connection.post(path, body)
        self.tally.record(kind, status, started, time.perf_counter())
        return status, answer

    async def run(self) -> None:
        """Plan, reserve every epoch, release, complete; again until the window closes."""
        clock = self.tally.clock
        cycle = 0
        while clock.running():
            dataset_id = self.dataset_ids[(self.index + cycle) % len(self.dataset_ids)]
            cycle += 1
            status, body = await self._call(
                "plan", f"/v1/datasets/{dataset_id}/runs", self.mix.plan
            )
            if status != 201:
                continue
            run_id = json.loads(body)["id"]
            for _ in range(EPOCHS):
                if not clock.running():
                    return
                await self._call("epoch", f"/v1/runs/{run_id}/epochs")
            for release in self.mix.releases:
                if not clock.running():
                    return
                await self._call("release", f"/v1/datasets/{dataset_id}/releases", release)
            await self._call("complete", f"/v1/runs/{run_id}/complete")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / _CLOCK_TICK


def cpu_counters(pgid: int) -> tuple[float, float, float, float]:
    """(wall, client, server, machine) seconds now."""
    return time.perf_counter(), time.process_time(), group_cpu_seconds(pgid), machine_busy_seconds()


async def sample_cpu(clock: Clock, pgid: int) -> Cpu:
    """The CPU used over the window, sampled at its start and end."""
    await asyncio.sleep(max(0.0, clock.window_start - time.perf_counter()))
    before = cpu_counters(pgid)
    await asyncio.sleep(max(0.0, clock.window_end - time.perf_counter()))
    after = cpu_counters(pgid)
    wall = after[0] - before[0]
    client, server, machine = ((b - a) / wall for a, b in zip(before[1:], after[1:], strict=True))
    return Cpu(client, server, machine)


async def drive_async(
    port: int,
    token: str,
    dataset_ids: Sequence[str],
    clients: int,
    warmup: float,
    duration: float,
    pgid: int,
) -> Load:
    """Run `clients` simulated trainers for warm-up + window; the window's figures."""
    tally = Tally(Clock.starting_now(warmup, duration))
    mix = Mix.default()
    trainers = [
        Trainer(i, Connection(port, token), dataset_ids, mix, tally) for i in range(clients)
    ]
    sampler = asyncio.create_task(sample_cpu(tally.clock, pgid))
    try:
        await asyncio.gather(*(trainer.run() for trainer in trainers))
        return tally.load(await sampler)
    finally:
        sampler.cancel()
        for trainer in trainers:
            trainer.connection.close()


def drive(
    server: Server,
    token: str,
    dataset_ids: Sequence[str],
    clients: int,
    warmup: float,
    duration: float,
) -> Load:
    """`drive_async` on a uvloop event loop (the loop uvicorn uses too)."""
    return uvloop.run(
        drive_async(server.port, token, dataset_ids, clients, warmup, duration, server.pgid)
    )


# -- servers and databases ----------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A server started here: its port and process group."""

    port: int
    pgid: int

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate a process group (uvicorn and its workers), killing it if it lingers."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with suppress(ProcessLookupError):  # a worker the supervisor left behind
        os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def serving(command: list[str], env: dict[str, str], log: Path) -> Iterator[Server]:
    """Start `command --port P` in its own process group; yield once /readyz answers 2xx."""
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            server = Server(port, process.pid)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
                with suppress(httpx.TransportError):
                    if httpx.get(f"{server.url}/readyz", timeout=1).is_success:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.1)
            yield server
        finally:
            stop(process)


def ledger_server(url: str, workers: int, workdir: Path) -> AbstractContextManager[Server]:
    """`privacy-ledger serve` on `url` with `workers` workers."""
    env = {**os.environ, "LEDGER_DATABASE_URL": url, "LEDGER_ADMIN_KEY": ADMIN_KEY}
    if workers > 1:  # as `serve` does, but in our scratch folder so that it is removed
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-", dir=workdir)
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
    log = workdir / f"ledger-{uuid.uuid4().hex[:8]}.log"
    return serving([*command, "--workers", str(workers)], env, log)


def framework_server(workers: int, workdir: Path) -> AbstractContextManager[Server]:
    """`null_app` under uvicorn with `workers` workers, configured as `serve` runs ours."""
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.load:null_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--workers",
        str(workers),
        "--no-access-log",
    ]
    return serving(command, dict(os.environ), workdir / f"null-{workers}.log")


@contextmanager
def scratch_postgres(admin_url: str, purpose: str) -> Iterator[str]:
    """A PostgreSQL database created here and dropped on the way out; yields its URL."""
    name = f"bench_{purpose}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def fresh_database(backend: str, admin_url: str, workdir: Path) -> Iterator[str]:
    """An empty database of `backend` (a SQLite file removed on the way out); yields its URL."""
    if backend == "postgres":
        with scratch_postgres(admin_url, "load") as url:
            yield url
        return
    path = workdir / f"ledger-{uuid.uuid4().hex[:8]}.db"
    try:
        yield f"sqlite:///{path}"
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def admin_client(server: Server) -> httpx.Client:
    """An httpx client with the bootstrap admin key (set-up and audits, off the measured path)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=300)


def prepare(server: Server, count: int) -> tuple[list[str], str]:
    """Create `count` datasets and a trainer key; (dataset ids, trainer key)."""
    dataset_ids = [f"load-{i:02d}" for i in range(count)]
    with admin_client(server) as http:
        for dataset_id in dataset_ids:
            body = {"id": dataset_id, "epsilon_cap": EPSILON_CAP, "delta": DELTA}
            http.post("/v1/datasets", json=body).raise_for_status()
        answer = http.post("/v1/keys", json={"role": "trainer", "name": "bench.load"})
        answer.raise_for_status()
        return dataset_ids, str(answer.json()["key"])


def audit(server: Server, dataset_ids: Sequence[str], load: Load) -> list[str]:
    """The overspend check: chains verify, no ε above the cap, admissions match the entries."""
    problems: list[str] = []
    kinds: Counter[str] = Counter()
    with admin_client(server) as http:
        for dataset_id in dataset_ids:
            path = f"/v1/datasets/{dataset_id}"
            verdict = http.get(f"{path}/ledger/verify").json()
            if not verdict["ok"]:
                problems.append(f"{dataset_id}: chain does not verify: {verdict['problems'][:2]}")
            entries = http.get(f"{path}/ledger", params={"format": "export"}).json()["data"]
            kinds.update(entry["kind"] for entry in entries)
            reported = [http.get(path).json()["epsilon_reserved"]]
            reported += [e["epsilon_spent_after"] for e in entries]
            reported += [e["epsilon_reserved_after"] for e in entries]
            if max(reported) > EPSILON_CAP:
                problems.append(f"{dataset_id}: ε {max(reported):g} above the cap")
    for kind, admitted in (
        ("hold", load.plans),
        ("charge", load.charges),
        ("release_hold", load.completions),
    ):
        if kinds[kind] != admitted:
            problems.append(f"{admitted} admitted but {kinds[kind]} {kind} entries")
    return problems


def pgbench_tps(admin_url: str, clients: int, duration: float, workdir: Path) -> float:
    """Transactions/s of pgbench updating one row with `clients` clients, in a scratch database."""
    script = workdir / "update-one-row.sql"
    script.write_text("UPDATE ceiling SET v = v + 1 WHERE id = 1;\n")
    with scratch_postgres(admin_url, "pgbench") as url:
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE ceiling (id integer PRIMARY KEY, v bigint)"))
            connection.execute(text("INSERT INTO ceiling VALUES (1, 0)"))
        engine.dispose()
        target = make_url(url)
        env = dict(os.environ)
        if target.password:
            env["PGPASSWORD"] = str(target.password)
        command = ["pgbench", "-n", "-M", "prepared", "-f", str(script)]
        command += ["-c", str(clients), "-j", str(min(clients, os.cpu_count() or 1))]
        command += ["-T", str(max(1, round(duration)))]
        command += ["-h", target.host or "127.0.0.1", "-p", str(target.port or 5432)]
        command += ["-U", target.username or "postgres", str(target.database)]
        result = subprocess.run(
            command, capture_output=True, text=True, check=True, env=env, timeout=duration + 120
        )
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    if found is None:
        raise RuntimeError(f"no tps in pgbench's output: {result.stdout[-500:]}")
    return float(found.group(1))


# -- growth -------------------------------------------------------------------------------


def relax_durability(db: Database) -> None:
    """Seeding only: no fsync per commit on this handle's connections (a throwaway database)."""
    statement = "PRAGMA synchronous=OFF" if db.is_sqlite else "SET synchronous_commit TO off"

    @event.listens_for(db.write_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(statement)
        cursor.close()
        dbapi_connection.commit()


class Seeder:
    """Writes ledger history through the domain layer, as the routes would for the trainer mix."""

    def __init__(self, db: Database, dataset_id: str) -> None:
        self.db = db
        self.dataset_id = dataset_id
        self.principal = keys.Principal(keys.BOOTSTRAP_ID, "admin")
        # σ calibrated once and given to every plan: the same curves as the HTTP mix's target
        # ε, without paying the calibration again for each of thousands of plans.
        sigma = calibrate.noise_multiplier(
            TARGET_EPSILON, DELTA, SAMPLE_RATE, STEPS_PER_EPOCH * EPOCHS
        )
        self.plan = runs.RunSpec(
            sample_rate=SAMPLE_RATE,
            steps_per_epoch=STEPS_PER_EPOCH,
            epochs=EPOCHS,
            target_epsilon=None,
            noise_multiplier=sigma,
            sampling="poisson",
            max_grad_norm=1.0,
            name="bench-seed",
            lease_seconds=3600,
        )
        self.releases = [
            releases.ReleaseSpec(mechanism, 1.0, epsilon, delta, None, None, None)
            for mechanism, epsilon, delta in RELEASES
        ]
        self.entries = 0

    def _key(self) -> Idempotency:
        # Seeded keys are never presented again: any fingerprint will do.
        key = str(uuid.uuid4())
        digest = hashlib.sha256(key.encode()).hexdigest()
        return Idempotency(self.principal.id, key, digest, digest)

    def create_dataset(self) -> None:
        """The dataset (its `dataset_created` entry is the first)."""
        spec = datasets.DatasetSpec(self.dataset_id, EPSILON_CAP, DELTA)
        datasets.create(self.db, self.principal, spec, render.dataset, self._key())
        self.entries = 1

    def trainer_key(self) -> str:
        """A trainer key for the measuring client."""
        outcome = keys.create(
            self.db,
            self.principal,
            role="trainer",
            datasets=None,
            name="bench.load",
            render=render.key,
        )
        return str(outcome.body["key"])

    def until(self, entries: int) -> None:
        """Run trainer-mix cycles until the dataset has at least `entries` entries."""
        p = self.principal
        while self.entries < entries:
            planned = runs.create(
                self.db, p, self.dataset_id, self.plan, render.run_result, idempotency=self._key()
            )
            assert isinstance(planned, Outcome)
            run_id = planned.body["id"]
            for _ in range(EPOCHS):
                runs.reserve_epoch(self.db, p, run_id, render.epoch, idempotency=self._key())
            for spec in self.releases:
                releases.create(
                    self.db, p, self.dataset_id, spec, render.release, idempotency=self._key()
                )
            finished = runs.finish(
                self.db, p, run_id, "completed", render.run_result, idempotency=self._key()
            )
            self.entries = int(finished.body["dataset"]["ledger_seq"])
        self.db.dispose()  # nothing of ours stays connected while the server runs


@dataclass(frozen=True)
class GrowthPoint:
    """Epoch admissions with `entries` entries already on the dataset: latency and server CPU."""

    backend: str
    entries: int
    latencies: list[float]
    server_cpu_ms: float  # the server's CPU per admission: cost, unlike latency, ignores waits

    def percentile_ms(self, percent: int) -> float:
        """A latency percentile in milliseconds."""
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[percent - 1] * 1e3


async def epoch_latencies(port: int, token: str, run_id: str, count: int) -> list[float]:
    """Seconds per epoch admission, `count` of them, one request at a time."""
    connection = Connection(port, token)
    latencies = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            status, body = await connection.post(f"/v1/runs/{run_id}/epochs")
            latencies.append(time.perf_counter() - started)
            if status != 201:
                raise RuntimeError(f"epoch admission answered {status}: {body[:300]!r}")
    finally:
        connection.close()
    return latencies


def measure_growth(
    backend: str, url: str, sizes: Sequence[int], requests: int, workdir: Path
) -> list[GrowthPoint]:
    """Seed to each size in turn, (re)start the server and time epoch admissions."""
    db = Database(url)
    relax_durability(db)
    migrate.upgrade(db.write_engine)
    seeder = Seeder(db, "growth")
    seeder.create_dataset()
    token = seeder.trainer_key()
    warmup = max(10, requests // 10)
    plan = {
        "sample_rate": SAMPLE_RATE,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "epochs": warmup + requests,
        "noise_multiplier": seeder.plan.noise_multiplier,
    }
    points = []
    for size in sizes:
        started = time.perf_counter()
        seeder.until(size)
        seconds = time.perf_counter() - started
        progress(f"growth {backend}: seeded to {seeder.entries:,} entries in {seconds:.0f} s")
        with ledger_server(url, 1, workdir) as server, admin_client(server) as http:
            answer = http.post("/v1/datasets/growth/runs", json=plan)
            answer.raise_for_status()
            run_id = answer.json()["id"]
            uvloop.run(epoch_latencies(server.port, token, run_id, warmup))
            cpu_before = group_cpu_seconds(server.pgid)
            latencies = uvloop.run(epoch_latencies(server.port, token, run_id, requests))
            server_cpu_ms = (group_cpu_seconds(server.pgid) - cpu_before) / requests * 1e3
            http.post(f"/v1/runs/{run_id}/complete").raise_for_status()
            points.append(GrowthPoint(backend, seeder.entries, latencies, server_cpu_ms))
            seeder.entries = int(http.get("/v1/datasets/growth").json()["ledger_seq"])
            if size == sizes[-1]:
                verdict = http.get("/v1/datasets/growth/ledger/verify").json()
                if not verdict["ok"]:
                    raise RuntimeError(f"the seeded chain does not verify: {verdict['problems']}")
    return points


# -- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One load configuration."""

    backend: str
    workers: int
    datasets: int
    clients: int


@dataclass(frozen=True)
class Measured:
    """One configuration's load and its overspend check's problems."""

    config: Config
    load: Load
    problems: list[str]


def progress(line: str) -> None:
    """A timestamped progress line on stderr (the tables go to stdout)."""
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """Rows as a Markdown table, or as aligned plain text."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in [headers, *rows]
    )


def number(value: float | None, digits: int = 0) -> str:
    """A figure for a table cell ("-" when not measured)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(value: float, ceiling: float | None) -> str:
    """`value` as a fraction of its ceiling."""
    return "-" if not ceiling else f"{value / ceiling:.2f}"


def machine_lines(backends: Sequence[str], admin_url: str) -> list[str]:
    """The machine, the software, the load average now and the command."""
    cpu_model = "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    lines = [
        f"machine: {os.cpu_count()} cores ({cpu_model}), {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
    ]
    if "postgres" in backends:
        engine = create_engine(admin_url)
        with engine.connect() as connection:
            lines.append(str(connection.execute(text("SELECT version()")).scalar_one()))
        engine.dispose()
    load1, load5, _ = os.getloadavg()
    lines.append(f"load average at start: {load1:.2f} (1 min), {load5:.2f} (5 min)")
    lines.append("command: .venv/bin/python -m bench.load " + " ".join(sys.argv[1:]))
    return lines


def load_table(
    measured: Sequence[Measured],
    framework: dict[tuple[int, int], Load],
    pgbench: dict[int, float],
    markdown: bool,
) -> str:
    """The load figures, one row per configuration."""
    headers = [
        "backend", "workers", "datasets", "clients", "adm/s", "÷ framework", "÷ pgbench",
        "p50 ms", "p95 ms", "p99 ms", "409", "5xx", "failed",
        "client CPU", "server CPU", "machine CPU", "overspend check",
    ]  # fmt: skip
    rows = []
    for m in measured:
        c, load = m.config, m.load
        ceiling = framework.get((c.workers, c.clients))
        rows.append(
            [
                c.backend, str(c.workers), str(c.datasets), str(c.clients), number(load.rate),
                ratio(load.rate, ceiling.rate if ceiling else None),
                ratio(load.rate, pgbench.get(c.clients) if c.backend == "postgres" else None),
                number(load.percentile_ms(50), 1), number(load.percentile_ms(95), 1),
                number(load.percentile_ms(99), 1), str(load.refused), str(load.server_errors),
                str(load.failures), number(load.cpu.client, 2), number(load.cpu.server, 2),
                number(load.cpu.machine, 2), "; ".join(m.problems) or "ok",
            ]
        )  # fmt: skip
    return table(headers, rows, markdown)


def ceiling_table(
    framework: dict[tuple[int, int], Load], pgbench: dict[int, float], markdown: bool
) -> str:
    """The ceilings: the null FastAPI app per workers × clients, pgbench per clients."""
    headers = ["workers", "clients", "framework adm/s", "framework p50 ms", "framework p99 ms"]
    headers += ["client CPU", "machine CPU", "pgbench tps (1 row)"]
    rows = [
        [
            str(workers), str(clients), number(load.rate), number(load.percentile_ms(50), 1),
            number(load.percentile_ms(99), 1), number(load.cpu.client, 2),
            number(load.cpu.machine, 2), number(pgbench.get(clients)),
        ]
        for (workers, clients), load in sorted(framework.items())
    ]  # fmt: skip
    return table(headers, rows, markdown)


def growth_table(points: Sequence[GrowthPoint], markdown: bool) -> str:
    """Epoch admission latency and server CPU against history, with ratios to the smallest."""
    headers = ["backend", "entries before", "p50 ms", "p99 ms", "server CPU ms"]
    headers += ["p50 ÷ smallest", "p99 ÷ smallest", "CPU ÷ smallest"]
    rows = []
    for point in points:
        first = next(p for p in points if p.backend == point.backend)
        rows.append(
            [
                point.backend, f"{point.entries:,}",
                number(point.percentile_ms(50), 2), number(point.percentile_ms(99), 2),
                number(point.server_cpu_ms, 2),
                f"{point.percentile_ms(50) / first.percentile_ms(50):.2f}",
                f"{point.percentile_ms(99) / first.percentile_ms(99):.2f}",
                f"{point.server_cpu_ms / first.server_cpu_ms:.2f}",
            ]
        )  # fmt: skip
    return table(headers, rows, markdown)


def goals(measured: Sequence[Measured], points: Sequence[GrowthPoint]) -> list[str]:
    """The issue's goals, each met / missed / not measured, with the figure that decides it."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    cores = f" (this machine: {os.cpu_count()} cores)"
    pg2 = [m for m in measured if m.config.backend == "postgres" and m.config.workers == 2]
    if pg2:
        best = max(pg2, key=lambda m: m.load.rate)
        c = best.config
        lines.append(
            f"≥{GOAL_ADMISSIONS_PER_S:,.0f} admissions/s, PostgreSQL, 2 workers{cores}: "
            f"{verdict(best.load.rate >= GOAL_ADMISSIONS_PER_S)} — best {best.load.rate:,.0f}/s "
            f"({c.clients} clients, {c.datasets} datasets)"
        )
    else:
        lines.append("≥1,000 admissions/s, PostgreSQL, 2 workers: not measured")
    at_goal = [m for m in measured if m.config.clients == GOAL_P99_CLIENTS]
    if at_goal:
        met = [m for m in at_goal if m.load.percentile_ms(99) < GOAL_P99_MS]
        worst = max(at_goal, key=lambda m: m.load.percentile_ms(99))
        c = worst.config
        lines.append(
            f"p99 < {GOAL_P99_MS:.0f} ms at {GOAL_P99_CLIENTS} clients: "
            f"{verdict(len(met) == len(at_goal))} — {len(met)} of {len(at_goal)} configurations; "
            f"worst {worst.load.percentile_ms(99):.1f} ms ({c.backend}, {c.workers} workers, "
            f"{c.datasets} datasets)"
        )
    else:
        lines.append(f"p99 < {GOAL_P99_MS:.0f} ms at {GOAL_P99_CLIENTS} clients: not measured")
    for backend in dict.fromkeys(p.backend for p in points):
        mine = [p for p in points if p.backend == backend]
        growth = mine[-1].percentile_ms(50) / mine[0].percentile_ms(50)
        lines.append(
            f"epoch p50 at {mine[-1].entries:,} entries within {GOAL_GROWTH_RATIO - 1:.0%} of "
            f"{mine[0].entries:,} ({backend}): {verdict(growth <= GOAL_GROWTH_RATIO)} — "
            f"ratio {growth:.2f} (p99 ratio "
            f"{mine[-1].percentile_ms(99) / mine[0].percentile_ms(99):.2f}, server CPU ratio "
            f"{mine[-1].server_cpu_ms / mine[0].server_cpu_ms:.2f})"
        )
    if not points:
        lines.append("latency growth with history: not measured")
    return lines


# -- main ---------------------------------------------------------------------------------


def integers(text_value: str) -> list[int]:
    """A comma-separated list of positive integers."""
    values = [int(v) for v in text_value.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text_value!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--workers", type=integers, default=[1, 2], help="e.g. 1,2")
    parser.add_argument("--clients", type=integers, default=[8, 32, 64], help="e.g. 8,32,64")
    parser.add_argument("--datasets", type=integers, default=[1, 16], help="e.g. 1,16")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds first (default 2)")
    parser.add_argument(
        "--growth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure epoch latency against ledger history",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s windows, growth to 5,000 entries",
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("LEDGER_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL URL allowed to create and drop databases",
    )
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 2.0
    args.growth_sizes = (100, 1_000, 5_000) if args.quick else (100, 10_000, 100_000)
    args.growth_requests = 200 if args.quick else 2_000
    return args


def postgres_available(admin_url: str) -> bool:
    """Whether PostgreSQL answers at `admin_url`."""
    engine = create_engine(admin_url)
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()


def run_all(args: argparse.Namespace, backends: list[str], workdir: Path) -> None:
    """Every configuration, the ceilings and the growth; then the tables and the goals."""
    machine = machine_lines(backends, args.postgres_url)  # before the load moves the average
    framework: dict[tuple[int, int], Load] = {}
    pgbench: dict[int, float] = {}
    measured: list[Measured] = []
    points: list[GrowthPoint] = []
    if "postgres" in backends:
        for clients in args.clients:
            pgbench[clients] = pgbench_tps(args.postgres_url, clients, args.duration, workdir)
            progress(f"pgbench, {clients} clients: {pgbench[clients]:,.0f} tps")
    for workers in args.workers:
        with framework_server(workers, workdir) as server:
            for clients in args.clients:
                load = drive(server, "none", ["null"], clients, args.warmup, args.duration)
                framework[(workers, clients)] = load
                progress(f"framework, {workers} workers, {clients} clients: {load.rate:,.0f} adm/s")
        for backend in backends:
            for count in args.datasets:
                for clients in args.clients:
                    config = Config(backend, workers, count, clients)
                    with (
                        fresh_database(backend, args.postgres_url, workdir) as url,
                        ledger_server(url, workers, workdir) as server,
                    ):
                        dataset_ids, token = prepare(server, count)
                        load = drive(
                            server, token, dataset_ids, clients, args.warmup, args.duration
                        )
                        problems = audit(server, dataset_ids, load)
                    measured.append(Measured(config, load, problems))
                    progress(
                        f"{backend}, {workers} workers, {count} datasets, {clients} clients: "
                        f"{load.rate:,.0f} adm/s, p99 {load.percentile_ms(99):.1f} ms, "
                        f"check {'; '.join(problems) or 'ok'}"
                    )
    if args.growth:
        for backend in backends:
            with fresh_database(backend, args.postgres_url, workdir) as url:
                points += measure_growth(
                    backend, url, args.growth_sizes, args.growth_requests, workdir
                )

    print("\n".join(machine))
    print(
        f"window {args.duration:g} s after {args.warmup:g} s warm-up; per run: 1 plan, {EPOCHS} "
        f"epochs, {len(RELEASES)} releases, 1 completion; dataset cap ε={EPSILON_CAP:g}"
    )
    print("\nLoad (adm/s and latency over the window; 409/5xx/failed over the whole run)\n")
    print(load_table(measured, framework, pgbench, args.markdown))
    print("\nCeilings (same client, same window)\n")
    print(ceiling_table(framework, pgbench, args.markdown))
    if points:
        print(f"\nGrowth: epoch admissions, 1 client, {args.growth_requests} requests\n")
        print(growth_table(points, args.markdown))
    print("\nGoals\n")
    print("\n".join(f"- {line}" for line in goals(measured, points)))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if "postgres" in backends and not postgres_available(args.postgres_url):
        if args.backend == "postgres":
            sys.exit(f"bench.load: PostgreSQL does not answer at {args.postgres_url}")
        progress("PostgreSQL does not answer: SQLite only, no pgbench ceiling")
        backends = ["sqlite"]
    # SIGTERM unwinds like Ctrl-C, so every server and scratch database is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-load-") as workdir:
            run_all(args, backends, Path(workdir))
    except KeyboardInterrupt:
        sys.exit("bench.load: interrupted (servers stopped, scratch databases dropped)")


if __name__ == "__main__":
    main()
