"""The ceilings every load figure is compared with, measured in the same run.

- framework: `null_app`, one FastAPI endpoint that does nothing (an `async def`, as our
  admission routes are),
  served by uvicorn with the same worker count and driven by the same client;
- database (PostgreSQL only): `pgbench -M prepared` with one UPDATE of one row, as many
  clients, in a throwaway database. An admission locks and updates one dataset row, so this
  bounds the admissions/s of one dataset.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.load.servers import Server, scratch_postgres, serving


def null_app() -> FastAPI:
    """The framework's ceiling: every POST (and GET) answered at once with a fixed body.

    The endpoint is an `async def`, as our admission routes are (until 2026-12-07 they and it
    were plain `def`s, each request paying a hop to the thread pool). Its body carries an `id`,
    so the trainer mix runs against it unchanged.
    """
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def nothing(path: str) -> JSONResponse:
        return JSONResponse({"id": "run_null"}, status_code=201)

    return app


def framework_server(workers: int, workdir: Path) -> AbstractContextManager[Server]:
    """`null_app` under uvicorn with `workers` workers, configured as `serve` runs ours."""
    command = [sys.executable, "-m", "uvicorn", "bench.load.ceilings:null_app", "--factory"]
    command += ["--host", "127.0.0.1", "--workers", str(workers), "--no-access-log"]
    return serving(command, dict(os.environ), workdir / f"null-{workers}.log", workers)


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
