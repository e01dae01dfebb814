"""The workloads: the trainer mix, the datasets it runs on, and the loop that drives it.

Each simulated trainer, on its own keep-alive connection, loops over the mix: plan a run
(target ε), reserve its epochs, make two releases (Gaussian and Laplace), complete the run;
one dataset after another. A refused plan is followed by the releases all the same (a trainer
that may not train can still publish statistics), so once plans no longer fit, the small
charges keep racing for what is left of the cap.

Two workloads: `headroom` (cap ε=10⁴, the schema's largest: ~10⁵ mix cycles fit, so refusals
are rare and the figures are the admission path's) and `capped` (cap ε=2: three plans and about
thirty releases fit, so every dataset reaches its cap within seconds under the same
concurrency, and the overspend check sees what the cap filter does at the boundary).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import uvloop

from bench.load.client import Clock, Connection, Load, Tally, sample_cpu
from bench.load.servers import Server, admin_client

DELTA = 1e-5
SAMPLE_RATE, STEPS_PER_EPOCH, EPOCHS, TARGET_EPSILON = 0.01, 100, 10, 1.0
RELEASES = (("gaussian", 0.05, 1e-7), ("laplace", 0.05, None))  # (mechanism, ε, δ)


@dataclass(frozen=True)
class Workload:
    """The datasets' cap: whether the load runs with headroom or up against the cap."""

    name: str
    epsilon_cap: float

    @property
    def reaches_cap(self) -> bool:
        """Whether the datasets are meant to reach their cap during the run."""
        return self is not HEADROOM


HEADROOM = Workload("headroom", 1e4)
CAPPED = Workload("capped", 2.0)
EPSILON_CAP = HEADROOM.epsilon_cap
# A capped run lasts until every dataset has refused a release, or this long at most.
CAPPED_DEADLINE_S = 60.0


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

    async def _call(
        self, kind: str, path: str, body: bytes = b"", dataset_id: str | None = None
    ) -> tuple[int, bytes]:
        started = time.perf_counter()
        status, answer = await self.connection.post(path, body)
        ended = time.perf_counter()
        self.tally.record(kind, status, started, ended, body=answer, dataset_id=dataset_id)
        return status, answer

    async def run(self) -> None:
        """Plan, reserve every epoch, release, complete; again until the window closes."""
        tally = self.tally
        cycle = 0
        while tally.running():
            dataset_id = self.dataset_ids[(self.index + cycle) % len(self.dataset_ids)]
            cycle += 1
            path = f"/v1/datasets/{dataset_id}"
            status, body = await self._call("plan", f"{path}/runs", self.mix.plan, dataset_id)
            run_id = json.loads(body)["id"] if status == 201 else None
            for _ in range(EPOCHS if run_id else 0):
                if not tally.running():
                    return
                await self._call("epoch", f"/v1/runs/{run_id}/epochs")
            for release in self.mix.releases:
                if not tally.running():
                    return
                await self._call("release", f"{path}/releases", release, dataset_id)
            if run_id:
                await self._call("complete", f"/v1/runs/{run_id}/complete")


async def drive_async(
    port: int,
    token: str,
    dataset_ids: Sequence[str],
    clients: int,
    warmup: float,
    duration: float,
    pgid: int,
    stop_at_cap: bool = False,
) -> Load:
    """Run `clients` simulated trainers for warm-up + window; the window's figures.

    With `stop_at_cap` the trainers stop as soon as every dataset has refused a release, so a
    capped run lasts until its caps are reached, with warm-up + window as its deadline.
    """
    tally = Tally(Clock.starting_now(warmup, duration), stop_at_cap=len(dataset_ids) * stop_at_cap)
    mix = Mix.default()
    trainers = [
        Trainer(i, Connection(port, token), dataset_ids, mix, tally) for i in range(clients)
    ]
    sampler = asyncio.create_task(sample_cpu(tally.clock, pgid, tally.done))
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
    *,
    stop_at_cap: bool = False,
) -> Load:
    """`drive_async` on a uvloop event loop (the loop uvicorn uses too)."""
    return uvloop.run(
        drive_async(
            server.port, token, dataset_ids, clients, warmup, duration, server.pgid, stop_at_cap
        )
    )


def prepare(server: Server, count: int, workload: Workload = HEADROOM) -> tuple[list[str], str]:
    """Create `count` datasets with the workload's cap and a trainer key; (dataset ids, key).

    Through the HTTP API with the admin key: a handful of requests on the server under test,
    so set-up goes the way an operator's does and needs nothing of the service's code.
    """
    dataset_ids = [f"load-{i:02d}" for i in range(count)]
    with admin_client(server) as http:
        for dataset_id in dataset_ids:
            body = {"id": dataset_id, "epsilon_cap": workload.epsilon_cap, "delta": DELTA}
            http.post("/v1/datasets", json=body).raise_for_status()
        answer = http.post("/v1/keys", json={"role": "trainer", "name": "bench.load"})
        answer.raise_for_status()
        return dataset_ids, str(answer.json()["key"])
