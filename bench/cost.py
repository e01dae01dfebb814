"""Cost: the server's CPU per request, by endpoint, with one sequential client (no queueing).

    .venv/bin/python -m bench.cost [--backend sqlite|postgres|both] [--requests N] [--repeats R]

Starts `privacy-ledger serve` (one worker) on a fresh database, as bench.load does, and
sends batches of one kind of request, one at a time, over one keep-alive connection: the
framework's floor (`GET /livez`), a dataset read, and the four admissions of the trainer mix
(plan, epoch within its plan, Laplace release, completion), every POST with a fresh
Idempotency-Key. For each batch it prints the wall time and the server's CPU (its process
group's user + system time, from /proc) per request; each figure is the least of `--repeats`
batches, the one least disturbed by whatever else the machine does. What load costs on top
(waiting, contention) is bench.load's business; this is the price of one request.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import uvloop

from bench.load.client import Connection, group_cpu_seconds
from bench.load.report import table
from bench.load.servers import (
    DEFAULT_POSTGRES_URL,
    Server,
    fresh_database,
    ledger_server,
    postgres_available,
)
from bench.load.workloads import Mix, prepare

Request = Callable[[], Awaitable[tuple[int, bytes]]]


async def measure(
    server: Server, token: str, dataset_id: str, requests: int, repeats: int
) -> list[tuple[str, float, float]]:
    """(kind, wall ms, server CPU ms) per request, least over the repeats."""
    connection = Connection(server.port, token)
    mix = Mix.default()
    plan = json.loads(mix.plan)
    plan["epochs"] = requests * (repeats + 1) + 10  # every measured epoch is within the plan
    status, body = await connection.post(
        f"/v1/datasets/{dataset_id}/runs", json.dumps(plan).encode()
    )
    assert status == 201, body
    long_run = json.loads(body)["id"]
    planned: list[str] = []

    async def new_plan() -> tuple[int, bytes]:
        status, body = await connection.post(f"/v1/datasets/{dataset_id}/runs", mix.plan)
        planned.append(json.loads(body)["id"])
        return status, body

    async def complete() -> tuple[int, bytes]:
        return await connection.post(f"/v1/runs/{planned.pop()}/complete")

    kinds: list[tuple[str, Request]] = [
        ("GET /livez", lambda: connection.get("/livez")),
        ("GET dataset", lambda: connection.get(f"/v1/datasets/{dataset_id}")),
        ("POST plan", new_plan),
        ("POST epoch", lambda: connection.post(f"/v1/runs/{long_run}/epochs")),
        (
            "POST release",
            lambda: connection.post(f"/v1/datasets/{dataset_id}/releases", mix.releases[1]),
        ),
        ("POST complete", complete),
    ]
    results = []
    try:
        for kind, send in kinds:
            best_wall = best_cpu = float("inf")
            for attempt in range(repeats + 1):  # the first batch warms up, unmeasured
                cpu0, wall0 = group_cpu_seconds(server.pgid), time.perf_counter()
                for _ in range(requests):
                    status, body = await send()
                    assert 200 <= status < 300, (kind, status, body[:200])
                wall = (time.perf_counter() - wall0) / requests
                cpu = (group_cpu_seconds(server.pgid) - cpu0) / requests
                if attempt:
                    best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
            results.append((kind, best_wall * 1e3, best_cpu * 1e3))
    finally:
        connection.close()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Measure each backend and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--requests", type=int, default=300, help="requests per batch")
    parser.add_argument("--repeats", type=int, default=3, help="measured batches per kind")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    args = parser.parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if "postgres" in backends and not postgres_available(args.postgres_url):
        print(f"PostgreSQL not reachable at {args.postgres_url}: measuring SQLite only")
        backends.remove("postgres")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as scratch:
        workdir = Path(scratch)
        for backend in backends:
            with (
                fresh_database(backend, args.postgres_url, workdir) as url,
                ledger_server(url, 1, workdir) as server,
            ):
                (dataset_id,), token = prepare(server, 1)
                for kind, wall, cpu in uvloop.run(
                    measure(server, token, dataset_id, args.requests, args.repeats)
                ):
                    rows.append([backend, kind, f"{wall:.2f}", f"{cpu:.2f}"])
    print(table(["backend", "request", "wall ms", "server CPU ms"], rows, markdown=True))


if __name__ == "__main__":
    main()
