"""Growth: epoch admission latency and server CPU against the dataset's ledger history.

One client, sequential, with 100, 10,000 and 100,000 existing entries on the dataset. The
history is written in-process through the domain's public operations (`service.domain`'s
`datasets.create` and `keys.create`, and the admissions `runs.plan`, `runs.epoch`,
`runs.finish` and `releases.release` submitted to the pipeline, as the routes submit them), so
the chain, cached curves and idempotency records are as the server would have written them;
only durability is relaxed while seeding (no fsync per commit; the server's connections keep
theirs). In-process because 100,000 entries over HTTP would take many minutes. The operations
answer typed results, and the seeder's pipeline records an empty answer for each
Idempotency-Key (nobody replays them), so nothing of `service.api` is imported. Each size has a
database of its own, seeded once, and a server of its own; the sizes are then measured in turn,
`GROWTH_SLICES` times over, a share of the requests each time (this VM's speed drifts by a third
within minutes: sizes measured one after the other differed by that much). The largest chain is
verified at the end.
"""

from __future__ import annotations

import hashlib
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvloop
from sqlalchemy import event

from accountant import calibrate
from bench.load.client import Connection, group_cpu_seconds
from bench.load.report import progress
from bench.load.servers import Server, admin_client, fresh_database, ledger_server
from bench.load.workloads import (
    DELTA,
    EPOCHS,
    EPSILON_CAP,
    RELEASES,
    SAMPLE_RATE,
    STEPS_PER_EPOCH,
    TARGET_EPSILON,
)
from service.domain import datasets, keys, releases, runs
from service.domain.pipeline import Idempotency, Pipeline, Replayed
from service.storage import migrate
from service.storage.database import Database

# Slices over the sizes: each size measured this many times, in turn with the others.
GROWTH_SLICES = 20


def relax_durability(db: Database) -> None:
    """Seeding only: no fsync per commit on this handle's connections (a throwaway database)."""
    statement = "PRAGMA synchronous=OFF" if db.is_sqlite else "SET synchronous_commit TO off"

    @event.listens_for(db.write_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(statement)
        cursor.close()
        dbapi_connection.commit()


def _unreplayed(_: object) -> tuple[int, str]:
    return 201, "{}"


def _fresh(answer: runs.Planned | runs.Finished | Replayed) -> runs.RunResult:
    # Seeded keys are never presented twice: a replay is a change of contract.
    if isinstance(answer, Replayed):
        raise TypeError("the domain replayed a seeded request")
    return answer


class Seeder:
    """Writes ledger history through the domain layer, as the routes would for the trainer mix."""

    def __init__(self, db: Database, dataset_id: str) -> None:
        self.db = db
        self.pipeline = Pipeline(db, _unreplayed)
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
        datasets.create(self.pipeline, self.principal, spec, self._key())
        self.entries = 1

    def trainer_key(self) -> str:
        """A trainer key for the measuring client (the operation adds its secret to the body)."""
        issued = keys.create(
            self.pipeline, self.principal, role="trainer", datasets=None, name="bench.load"
        )
        assert isinstance(issued, keys.KeyIssued)
        return issued.token

    def until(self, entries: int) -> None:
        """Run trainer-mix cycles until the dataset has at least `entries` entries."""
        p, pipeline = self.principal, self.pipeline
        while self.entries < entries:
            planned = pipeline.submit(
                runs.plan(pipeline, p, self.dataset_id, self.plan, self._key())
            )
            run_id = _fresh(planned).run.id
            for _ in range(EPOCHS):
                pipeline.submit(runs.epoch(p, run_id, self._key()))
            for spec in self.releases:
                pipeline.submit(releases.release(p, self.dataset_id, spec, self._key()))
            finished = pipeline.submit(runs.finish(p, run_id, "completed", self._key()))
            self.entries = _fresh(finished).dataset.ledger_seq
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
    backend: str,
    admin_url: str,
    sizes: Sequence[int],
    requests: int,
    workdir: Path,
    slices: int = GROWTH_SLICES,
) -> list[GrowthPoint]:
    """Seed one database to each size, serve each with its own server, then time epoch
    admissions on each in turn, `slices` times over (a share of `requests` each time): this
    VM's speed drifts by a third within minutes, so sizes measured one after the other,
    minutes apart, differed by that much whatever their history; interleaved in slices of a
    second or less, each size sees the same drift. One client, so one server works at a time."""
    with ExitStack() as stack:
        seeded: list[tuple[str, Seeder, str]] = []
        for size in sizes:
            url = stack.enter_context(fresh_database(backend, admin_url, workdir))
            db = Database(url)
            relax_durability(db)
            migrate.upgrade(db.write_engine)
            seeder = Seeder(db, "growth")
            seeder.create_dataset()
            token = seeder.trainer_key()
            started = time.perf_counter()
            seeder.until(size)
            seconds = time.perf_counter() - started
            progress(f"growth {backend}: seeded to {seeder.entries:,} entries in {seconds:.0f} s")
            seeded.append((url, seeder, token))
        share = max(1, requests // slices)
        targets = [
            stack.enter_context(_EpochTarget.serving(url, token, seeder, share * slices, workdir))
            for url, seeder, token in seeded
        ]
        for _ in range(slices):
            for target in targets:
                target.measure(share)
        verdict = targets[-1].http.get("/v1/datasets/growth/ledger/verify").json()
        if not verdict["ok"]:
            raise RuntimeError(f"the seeded chain does not verify: {verdict['problems']}")
        return [
            GrowthPoint(backend, seeder.entries, target.latencies, target.server_cpu_ms())
            for (_, seeder, _), target in zip(seeded, targets, strict=True)
        ]


class _EpochTarget:
    """One seeded database served by its own server (1 worker), with a run planned for the
    measured epochs; the database keeps that run's entries, so its size is given as seeded."""

    def __init__(self, server: Server, http: httpx.Client, token: str, run_id: str) -> None:
        self.server, self.http, self.token, self.run_id = server, http, token, run_id
        self.latencies: list[float] = []
        self.cpu_seconds = 0.0

    @classmethod
    @contextmanager
    def serving(
        cls, url: str, token: str, seeder: Seeder, requests: int, workdir: Path
    ) -> Iterator[_EpochTarget]:
        """Start the server, plan the run and warm it up; complete the run on the way out."""
        warmup = max(10, requests // 10)
        plan = {
            "sample_rate": SAMPLE_RATE,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "epochs": warmup + requests,
            "noise_multiplier": seeder.plan.noise_multiplier,
        }
        with ledger_server(url, 1, workdir) as server, admin_client(server) as http:
            answer = http.post("/v1/datasets/growth/runs", json=plan)
            answer.raise_for_status()
            target = cls(server, http, token, answer.json()["id"])
            uvloop.run(epoch_latencies(server.port, token, target.run_id, warmup))
            yield target
            http.post(f"/v1/runs/{target.run_id}/complete").raise_for_status()

    def measure(self, requests: int) -> None:
        """Time `requests` epoch admissions, one at a time, and the server's CPU for them."""
        cpu_before = group_cpu_seconds(self.server.pgid)
        self.latencies += uvloop.run(
            epoch_latencies(self.server.port, self.token, self.run_id, requests)
        )
        self.cpu_seconds += group_cpu_seconds(self.server.pgid) - cpu_before

    def server_cpu_ms(self) -> float:
        """The server's CPU per measured admission, in milliseconds."""
        return self.cpu_seconds / len(self.latencies) * 1e3
