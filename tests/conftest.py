"""Shared fixtures: a fresh database per test, on SQLite always and PostgreSQL when configured."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get("LEDGER_TEST_POSTGRES_URL")
POSTGRES_SKIP = (
    "PostgreSQL tests need LEDGER_TEST_POSTGRES_URL "
    "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres); .ci/run sets it"
)
# In CI a PostgreSQL test that cannot run is a failure, not a skip: a quarter of the suite
# silently skipping once made a CI run green that had never touched PostgreSQL.
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
_NOT_RUN = pytest.StashKey[int]()


def require_postgres() -> str:
    """The PostgreSQL URL for a test; without one it fails in CI (CI=true) and skips elsewhere."""
    if POSTGRES_URL:
        return POSTGRES_URL
    if IN_CI:
        pytest.fail(
            f"CI=true but LEDGER_TEST_POSTGRES_URL is not set: {POSTGRES_SKIP}",
            pytrace=False,
        )
    pytest.skip(POSTGRES_SKIP)


def _on_postgres(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return any(isinstance(v, str) and v == "postgresql" for v in params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside CI without PostgreSQL, its tests are left out and counted in one summary line
    (rather than one SKIPPED line per test location)."""
    if POSTGRES_URL or IN_CI:
        return
    left_out = [item for item in items if _on_postgres(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not _on_postgres(item)]
        config.stash[_NOT_RUN] = len(left_out)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The one line that says how many PostgreSQL tests were left out, and why."""
    left_out = config.stash.get(_NOT_RUN, 0)
    if left_out:
        terminalreporter.write_line(f"PostgreSQL: {left_out} tests not run. {POSTGRES_SKIP}")


@pytest.fixture(autouse=True, scope="session")
def _secret_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every app and server the suite starts keys its fingerprints from a file of its own
    (not `privacy-ledger.key` in the checkout); subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("secret") / "privacy-ledger.key"
        patch.setenv("LEDGER_SECRET_KEY_FILE", str(path))
        yield


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[str]:
    """An empty database: a SQLite file, or a PostgreSQL database created and dropped here."""
    if request.param == "sqlite":
        yield f"sqlite:///{os.path.join(tmp_path, 'ledger.db')}"
        return
    postgres_url = require_postgres()
    name = f"ledger_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
