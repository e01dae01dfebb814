"""Service fixtures: the real app on a real database, in process or as a live server."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from accountant import exact
from service.app import create_app
from service.domain.budget import Budget
from service.settings import Settings
from service.storage import migrate
from service.storage.database import Database
from service.storage.models import Dataset

ADMIN_KEY = "test-admin-" + secrets.token_hex(8)
ROOT = Path(__file__).resolve().parents[2]


class Api:
    """A thin caller: one bearer key over an httpx-like client."""

    def __init__(self, client: httpx.Client | TestClient, key: str | None) -> None:
        self.client = client
        self.key = key

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return {**headers, **(extra or {})}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, headers=self.headers(kwargs.pop("headers", None)), **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> httpx.Response:
        headers = self.headers(kwargs.pop("headers", None))
        return self.client.post(path, json=json, headers=headers, **kwargs)

    def patch(self, path: str, json: Any = None, **kwargs: Any) -> httpx.Response:
        headers = self.headers(kwargs.pop("headers", None))
        return self.client.patch(path, json=json, headers=headers, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.delete(path, headers=self.headers(kwargs.pop("headers", None)), **kwargs)

    def as_key(self, key: str | None) -> Api:
        return Api(self.client, key)

    def new_key(self, role: str, datasets: list[str] | None = None) -> str:
        response = self.post("/v1/keys", {"role": role, "datasets": datasets})
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    def create_dataset(
        self,
        dataset_id: str,
        epsilon_cap: float,
        delta: float = 1e-5,
        shares: dict[str, Any] | None = None,
    ) -> Any:
        body: dict[str, Any] = {"id": dataset_id, "epsilon_cap": epsilon_cap, "delta": delta}
        if shares is not None:
            body["shares"] = shares
        response = self.post("/v1/datasets", body)
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """The test database, migrated to head."""
    database = Database(database_url)
    try:
        migrate.upgrade(database.write_engine)
    finally:
        database.dispose()
    return database_url


@pytest.fixture
def database(migrated_url: str) -> Iterator[Database]:
    """A handle on the test database (for checks behind the API's back)."""
    database = Database(migrated_url)
    yield database
    database.dispose()


@pytest.fixture
def api(migrated_url: str) -> Iterator[Api]:
    """The real app in process (TestClient) with the bootstrap admin key."""
    settings = Settings(database_url=migrated_url, admin_key=ADMIN_KEY)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Api(client, ADMIN_KEY)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


LiveServer = Callable[..., str]


@pytest.fixture
def live_server(migrated_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """Start `privacy-ledger serve` in a subprocess (N workers); yields its base URL."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(workers: int = 1, log_level: str = "warning") -> str:
        port = free_port()
        env = {
            **os.environ,
            "LEDGER_DATABASE_URL": migrated_url,
            "LEDGER_ADMIN_KEY": ADMIN_KEY,
            "LEDGER_LOG_LEVEL": log_level,
        }
        log = open(tmp_path / f"server-{port}.log", "wb")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        process = subprocess.Popen(
            [*command, "--workers", str(workers)], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        processes.append(process)
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                output = (tmp_path / f"server-{port}.log").read_text()
                raise RuntimeError(f"server exited: {output}")
            try:
                if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                    return base_url
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready within 60 s")

    yield start
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cached_budget(database: Database, dataset_id: str) -> Budget:
    """The dataset's cached posted and pending curves, read straight from the database."""
    with database.read() as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        return Budget.of(row)


def replay_units(entries: list[dict[str, Any]], size: int) -> tuple[list[int], list[int]]:
    """(posted, pending) units replayed here from exported entries by kind, independently of
    the service's own replay."""
    posted, pending = [0] * size, [0] * size
    for entry in entries:
        units = entry["units"]
        if entry["kind"] == "hold":
            pending = exact.add(pending, units)
        elif entry["kind"] == "charge":
            posted = exact.add(posted, units)
            if entry["details"].get("from_hold"):
                pending = exact.subtract(pending, units)
        elif entry["kind"] == "release_hold":
            pending = exact.subtract(pending, units)
        elif entry["kind"] == "void" and units is not None:
            # A refund (or a void from before 0004); a void without units kept the cost.
            posted = exact.subtract(posted, units)
        elif entry["kind"] == "correction":
            posted = exact.add(posted, units)
        elif entry["kind"] == "hold_top_up":
            pending = exact.add(pending, units)
    return posted, pending
