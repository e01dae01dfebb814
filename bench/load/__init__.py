"""Load: real HTTP against `privacy-ledger serve`, beside the framework's and database's ceilings.

    .venv/bin/python -m bench.load [--backend sqlite|postgres|both] [--workers 1,2]
        [--clients 8,32,64] [--datasets 1,16] [--duration S] [--warmup S]
        [--growth/--no-growth] [--capped/--no-capped] [--quick] [--markdown]

For each backend × workers × datasets × clients it starts `privacy-ledger serve` on a free
loopback port and a fresh database (a temp SQLite file, or a PostgreSQL database created and
dropped here), creates the datasets and a trainer key over HTTP with the admin key, and runs N
simulated trainers doing the trainer mix in a loop; after a warm-up, a fixed window is
measured. An *admission* is an admitted plan, epoch or release (a 201). Every configuration
runs with headroom (cap ε=10⁴); with `--capped` (the default) each backend × workers × datasets
also runs at the most clients with datasets that reach their small cap, refusals counted.
After every run the overspend check reads the ledgers back and judges them.

The parts, each one job:

- `client`: the keep-alive HTTP/1.1 client, the run's clock and tally, CPU counters;
- `workloads`: the trainer mix, the two workloads (headroom, capped), the driving loop and
  the datasets' set-up;
- `servers`: `privacy-ledger serve` and scratch databases, started and cleaned up here;
- `ceilings`: the null FastAPI endpoint and pgbench;
- `overspend`: the check after each run (the cap held, the ledger is what was answered);
- `growth`: history seeded through the domain's operations, epoch latency against it;
- `report`: the tables and the issue's goals; `__main__`: the command line.

The names other benchmarks import (bench/cost.py, bench/inference.py) are re-exported here.
"""

from bench.load.client import Connection, group_cpu_seconds
from bench.load.report import progress, table
from bench.load.servers import (
    ADMIN_KEY,
    DEFAULT_POSTGRES_URL,
    Server,
    admin_client,
    fresh_database,
    ledger_server,
    postgres_available,
    scratch_postgres,
)
from bench.load.workloads import EPSILON_CAP, Mix, drive, prepare

__all__ = [
    "ADMIN_KEY",
    "DEFAULT_POSTGRES_URL",
    "EPSILON_CAP",
    "Connection",
    "Mix",
    "Server",
    "admin_client",
    "drive",
    "fresh_database",
    "group_cpu_seconds",
    "ledger_server",
    "postgres_available",
    "prepare",
    "progress",
    "scratch_postgres",
    "table",
]
