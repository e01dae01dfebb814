"""Shared fixtures: a fresh database per test, on SQLite always and PostgreSQL when configured."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get("LEDGER_TEST_POSTGRES_URL")
POSTGRES_SKIP = (
    "PostgreSQL tests need LEDGER_TEST_POSTGRES_URL "
    "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres); .ci/run sets it"
)


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
    if not POSTGRES_URL:
        pytest.skip(POSTGRES_SKIP)
    name = f"ledger_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
