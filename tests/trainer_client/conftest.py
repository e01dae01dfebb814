"""Fixtures for the trainer client's tests: a live ledger server for the integration tests.

The server is the real service (`python -m service.cli serve`) on a fresh SQLite
file, started once per session. If the service cannot be imported, every test
that needs it is skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainer_client import LedgerClient, _http

ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE_S = 60.0


@dataclass(frozen=True)
class LedgerServer:
    """A running ledger service: its base URL, its bootstrap admin key and its log file."""

    url: str
    admin_key: str
    log_path: Path

    def client(self, api_key: str | None = None, **kwargs: Any) -> LedgerClient:
        """A client of this server (admin unless `api_key` is given)."""
        return LedgerClient(self.url, api_key or self.admin_key, **kwargs)

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    # One client for all polls: building one per poll (TLS context, proxy lookup) costs CPU
    # the starting server needs.
    with httpx.Client(base_url=url, timeout=1.0, trust_env=False) as http:
        for path in ("/livez", "/readyz"):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the ledger server exited ({process.returncode}):\n"
                        f"{log_path.read_text(errors='replace')}"
                    )
                try:
                    if http.get(path).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the ledger server did not answer {path} within {STARTUP_DEADLINE_S} s:"
                        f"\n{log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.05)  # the poll interval, not a wait for something to happen


@pytest.fixture(scope="session")
def ledger_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerServer]:
    """The real service on a fresh SQLite file, started once for the session."""
    try:
        import service.cli  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"live ledger tests need the service, and `import service.cli` failed: {exc}")
    workdir = tmp_path_factory.mktemp("ledger-server")
    admin_key = "tc-admin-" + secrets.token_urlsafe(24)
    port = free_port()
    env = {
        **os.environ,
        "LEDGER_DATABASE_URL": f"sqlite:///{workdir / 'ledger.db'}",
        "LEDGER_ADMIN_KEY": admin_key,
        "LEDGER_LOG_LEVEL": "warning",
    }
    log_path = workdir / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        try:
            _wait_until_ready(process, url, log_path)
            yield LedgerServer(url=url, admin_key=admin_key, log_path=log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


NewDataset = Callable[..., str]


@pytest.fixture
def new_dataset(ledger_server: LedgerServer) -> NewDataset:
    """Create a dataset with a fresh id on the live server; returns its id."""

    def create(epsilon_cap: float, delta: float = 1e-5) -> str:
        dataset_id = "tc-" + uuid.uuid4().hex[:12]
        with ledger_server.client() as admin:
            admin.create_dataset(dataset_id, epsilon_cap=epsilon_cap, delta=delta)
        return dataset_id

    return create


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every backoff wait the clients ask for, recorded instead of slept."""
    waits: list[float] = []

    async def record_async(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(_http, "sleep", waits.append)
    monkeypatch.setattr(_http, "async_sleep", record_async)
    return waits
