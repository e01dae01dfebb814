"""A served process's application: the garbage collector tuned, the same app otherwise."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import app as app_module
from service.settings import Settings, get_settings


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_a_served_app_freezes_start_up_objects_and_collects_the_young_less_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEDGER_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("LEDGER_SECRET_KEY_FILE", str(tmp_path / "secret.key"))
    get_settings.cache_clear()
    gc.unfreeze()
    _, older, oldest = gc.get_threshold()
    served = app_module.served_app()
    assert gc.get_threshold() == (app_module.GC_YOUNG_THRESHOLD, older, oldest)
    assert gc.get_freeze_count() > 10_000  # the imports and the app, at least
    with TestClient(served) as client:
        assert client.get("/livez").status_code == 200
    get_settings.cache_clear()


@pytest.mark.usefixtures("restored_collector")
def test_create_app_leaves_the_collector_alone(tmp_path: Path) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}")
    app_module.create_app(settings, None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
