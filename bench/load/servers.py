"""Servers and databases the benchmarks start and clean up: `privacy-ledger serve`, scratch DBs.

Public for the other benchmarks too (bench/cost.py, bench/inference.py): `ledger_server` starts
`privacy-ledger serve` with N workers on a database URL, `fresh_database` yields an empty SQLite
file or PostgreSQL database, `admin_client` talks to a started server with the admin key.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = f"bench-admin-{secrets.token_hex(16)}"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT_S = 120.0
_READY_POLL_S = 0.1
# What uvicorn logs once a worker serves: `serving` waits for one per worker.
_WORKER_READY = b"Application startup complete."


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
def serving(
    command: list[str], env: dict[str, str], log: Path, workers: int = 1
) -> Iterator[Server]:
    """Start `command --port P` in its own process group; yield once /readyz answers 2xx and
    each of its `workers` uvicorn workers has started.

    Waiting for every worker matters: the workers share one listening socket, and one that is
    still starting accepts nothing, so clients that connect meanwhile all keep their connections
    on the others (with 2 workers, 64 keep-alive clients were once all on one of them, and a
    load run measured 590 adm/s where balanced runs measured about 800).
    """
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
                    if (
                        httpx.get(f"{server.url}/readyz", timeout=1).is_success
                        and log.read_bytes().count(_WORKER_READY) >= workers
                    ):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s")
                time.sleep(_READY_POLL_S)  # polling a deadline, not waiting blind
            yield server
        finally:
            stop(process)


def ledger_server(url: str, workers: int, workdir: Path) -> AbstractContextManager[Server]:
    """`privacy-ledger serve` on `url` with `workers` workers (admin key: ADMIN_KEY)."""
    env = {**os.environ, "LEDGER_DATABASE_URL": url, "LEDGER_ADMIN_KEY": ADMIN_KEY}
    if workers > 1:  # as `serve` does, but in our scratch folder so that it is removed
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-", dir=workdir)
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
    log = workdir / f"ledger-{uuid.uuid4().hex[:8]}.log"
    return serving([*command, "--workers", str(workers)], env, log, workers)


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


def admin_client(server: Server) -> httpx.Client:
    """An httpx client with the bootstrap admin key (set-up and audits, off the measured path)."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=300)
