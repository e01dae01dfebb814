"""`python -m bench.load`: every configuration, the ceilings and the growth; then the report."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import bench.load
from bench.load.ceilings import framework_server, pgbench_tps
from bench.load.client import Load
from bench.load.growth import GrowthPoint, measure_growth
from bench.load.overspend import audit
from bench.load.report import (
    Config,
    Measured,
    ceiling_table,
    goals,
    growth_table,
    load_table,
    machine_lines,
    progress,
)
from bench.load.servers import (
    DEFAULT_POSTGRES_URL,
    fresh_database,
    ledger_server,
    postgres_available,
)
from bench.load.workloads import (
    CAPPED,
    CAPPED_DEADLINE_S,
    EPOCHS,
    HEADROOM,
    RELEASES,
    Workload,
    drive,
    prepare,
)


def integers(text_value: str) -> list[int]:
    """A comma-separated list of positive integers."""
    values = [int(v) for v in text_value.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text_value!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    description = (bench.load.__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=description)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--workers", type=integers, help="e.g. 1,2 (default 1,2; quick 1)")
    parser.add_argument("--clients", type=integers, help="e.g. 8,32,64 (default; quick 32)")
    parser.add_argument("--datasets", type=integers, help="e.g. 1,16 (default 1,16; quick 4)")
    parser.add_argument("--duration", type=float, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds first (default 2)")
    parser.add_argument(
        "--growth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure epoch latency against ledger history",
    )
    parser.add_argument(
        "--capped",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also run each backend × workers × datasets at the most clients with datasets "
        f"whose cap (ε={CAPPED.epsilon_cap:g}) they reach",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (~1 min): 1 worker, 32 clients, 4 datasets, 2 s windows, growth to "
        "1,000 entries (options given explicitly win)",
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("LEDGER_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="a PostgreSQL URL allowed to create and drop databases",
    )
    args = parser.parse_args(argv)
    quick: dict[str, object] = {"workers": [1], "clients": [32], "datasets": [4]}
    quick |= {"duration": 2.0, "warmup": 0.5}
    full: dict[str, object] = {"workers": [1, 2], "clients": [8, 32, 64], "datasets": [1, 16]}
    full |= {"duration": 10.0, "warmup": 2.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.growth_sizes = (100, 1_000) if args.quick else (100, 10_000, 100_000)
    args.growth_requests = 100 if args.quick else 2_000
    return args


def configurations(args: argparse.Namespace, backends: Sequence[str], workers: int) -> list[Config]:
    """The load configurations of one worker count: headroom everywhere, capped at most clients.

    The capped runs use the largest client count, the concurrency at which a race past the cap
    is likeliest; one per backend × datasets keeps the default run's time within a tenth more.
    """
    found = []
    for backend in backends:
        for count in args.datasets:
            found += [Config(backend, workers, count, c, HEADROOM) for c in args.clients]
            if args.capped:
                found.append(Config(backend, workers, count, max(args.clients), CAPPED))
    return found


def measure(config: Config, args: argparse.Namespace, workdir: Path) -> Measured:
    """One configuration on a fresh database and server, and its overspend check."""
    workload: Workload = config.workload
    with (
        fresh_database(config.backend, args.postgres_url, workdir) as url,
        ledger_server(url, config.workers, workdir) as server,
    ):
        dataset_ids, token = prepare(server, config.datasets, workload)
        if workload.reaches_cap:  # from the first request, until every dataset is at its cap
            load = drive(server, token, dataset_ids, config.clients, 0.0, CAPPED_DEADLINE_S,
                         stop_at_cap=True)  # fmt: skip
        else:
            load = drive(server, token, dataset_ids, config.clients, args.warmup, args.duration)
        problems = audit(server, dataset_ids, load, workload)
    progress(
        f"{config.backend}, {config.workers} workers, {config.datasets} datasets, "
        f"{config.clients} clients, cap ε={workload.epsilon_cap:g}: {load.rate:,.0f} adm/s, "
        f"p99 {load.percentile_ms(99):.1f} ms, {load.refused} refused, "
        f"check {'; '.join(problems) or 'ok'}"
    )
    return Measured(config, load, problems)


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
        measured += [measure(c, args, workdir) for c in configurations(args, backends, workers)]
    if args.growth:
        for backend in backends:
            points += measure_growth(
                backend, args.postgres_url, args.growth_sizes, args.growth_requests, workdir
            )

    print("\n".join(machine))
    print(
        f"window {args.duration:g} s after {args.warmup:g} s warm-up; per run: 1 plan, {EPOCHS} "
        f"epochs, {len(RELEASES)} releases, 1 completion; dataset cap ε={HEADROOM.epsilon_cap:g}"
        + (f", or ε={CAPPED.epsilon_cap:g} where the datasets reach it" if args.capped else "")
    )
    print(
        "\nLoad (adm/s and latency over the window; refused (budget_exhausted), 5xx and failed "
        "over the whole run; at cap: datasets that refused a release)\n"
    )
    print(load_table(measured, framework, pgbench, args.markdown))
    print("\nCeilings (same client, same window)\n")
    print(ceiling_table(framework, pgbench, args.markdown))
    if points:
        print(f"\nGrowth: epoch admissions, 1 client, {args.growth_requests} requests\n")
        print(growth_table(points, args.markdown))
    print(f"\nGoals (this machine: {os.cpu_count()} cores)\n")
    print("\n".join(f"- {line}" for line in goals(measured, framework, points)))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run everything in a scratch folder, clean up on any exit."""
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
