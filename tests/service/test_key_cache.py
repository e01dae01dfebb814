"""API keys from a per-process cache: no lookup per request, and a revoked key refused by every
process within the bound (`LEDGER_KEY_CACHE_SECONDS`, default 1 s; docs/operations.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from service.app import create_app
from service.domain import keys
from service.domain.errors import Unauthorized
from service.settings import Settings
from service.storage.database import Database

from .conftest import ADMIN_KEY, Api, LiveServer

BOUND_S = Settings.model_fields["key_cache_seconds"].default


@contextmanager
def key_lookups(db: Database) -> Iterator[list[str]]:
    """The statements that read the api_keys table while the block runs."""
    seen: list[str] = []
    url = db.write_engine.url

    def count(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if conn.engine.url == url and "FROM api_keys" in statement:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", count)


@contextmanager
def _trainer(migrated_url: str, key_cache_seconds: float) -> Iterator[tuple[Database, Api]]:
    """An app with that key cache, a dataset "d" and a trainer key for it: (database, trainer)."""
    settings = Settings(
        database_url=migrated_url, admin_key=ADMIN_KEY, key_cache_seconds=key_cache_seconds
    )
    db = Database(migrated_url)
    try:
        with TestClient(create_app(settings, db), raise_server_exceptions=False) as client:
            admin = Api(client, ADMIN_KEY)
            admin.create_dataset("d", 1.0)
            yield db, admin.as_key(admin.new_key("trainer", ["d"]))
    finally:
        db.dispose()


def _trainer_calls(migrated_url: str, key_cache_seconds: float, calls: int) -> int:
    """How many key lookups `calls` reads with one trainer key cost."""
    with _trainer(migrated_url, key_cache_seconds) as (db, trainer):
        with key_lookups(db) as lookups:
            for _ in range(calls):
                assert trainer.get("/v1/datasets/d").status_code == 200
        return len(lookups)


def test_the_cache_saves_the_key_lookup_of_every_request_but_the_first(migrated_url: str) -> None:
    # A long bound, so the count does not depend on how fast this machine is today.
    assert _trainer_calls(migrated_url, key_cache_seconds=60, calls=20) == 1


def test_without_the_cache_every_request_looks_its_key_up(migrated_url: str) -> None:
    assert _trainer_calls(migrated_url, key_cache_seconds=0, calls=5) == 5


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _issued(database: Database) -> tuple[str, str]:
    with database.write() as session:
        row, token = keys.issue(session, role="trainer", datasets=None, name="cached")
        session.commit()
    return row.id, token


def test_a_key_revoked_elsewhere_is_trusted_at_most_the_bound(database: Database) -> None:
    clock = Clock()
    cache = keys.KeyCache(1.0, clock=clock)
    key_id, token = _issued(database)
    assert keys.authenticate(database, token, None, cache).id == key_id
    # Revoked by another process: this cache is not told.
    with database.write() as session:
        keys.revoke(session, key_id)
        session.commit()
    clock.now += 0.999
    with key_lookups(database) as lookups:
        assert keys.authenticate(database, token, None, cache).id == key_id
    assert lookups == []  # answered from the cache, within the bound
    clock.now += 0.001
    with pytest.raises(Unauthorized, match="revoked"):
        keys.authenticate(database, token, None, cache)
    # A refusal is not cached: it is looked up again, every time.
    with key_lookups(database) as lookups, pytest.raises(Unauthorized, match="revoked"):
        keys.authenticate(database, token, None, cache)
    assert len(lookups) == 1


def test_a_wrong_secret_is_refused_and_looked_up_even_when_its_key_id_is_cached(
    database: Database,
) -> None:
    cache = keys.KeyCache(60.0)
    key_id, token = _issued(database)
    assert keys.authenticate(database, token, None, cache).id == key_id
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(2):
        with key_lookups(database) as lookups, pytest.raises(Unauthorized, match="invalid"):
            keys.authenticate(database, forged, None, cache)
        assert len(lookups) == 1
    unknown = f"pl_key{'0' * 16}_{token.split('_', 2)[2]}"
    with key_lookups(database) as lookups, pytest.raises(Unauthorized, match="invalid"):
        keys.authenticate(database, unknown, None, cache)
    assert len(lookups) == 1
    assert keys.authenticate(database, token, None, cache).id == key_id


def test_revoking_through_this_process_refuses_the_key_at_once(migrated_url: str) -> None:
    settings = Settings(database_url=migrated_url, admin_key=ADMIN_KEY, key_cache_seconds=60)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        admin = Api(client, ADMIN_KEY)
        admin.create_dataset("d", 1.0)
        token = admin.new_key("trainer", ["d"])
        trainer = admin.as_key(token)
        assert trainer.get("/v1/datasets/d").status_code == 200  # now cached, for 60 s
        assert admin.delete(f"/v1/keys/{token.split('_')[1]}").status_code == 200
        refused = trainer.get("/v1/datasets/d")
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"


def test_a_key_revoked_through_one_serve_process_is_refused_by_another_within_the_bound(
    live_server: LiveServer,
) -> None:
    first = live_server()
    second = live_server(workers=2)  # two more processes, each with its own cache
    admin = Api(httpx.Client(base_url=first, timeout=10), ADMIN_KEY)
    admin.create_dataset("d", 1.0)
    token = admin.new_key("trainer", ["d"])
    headers = {"Authorization": f"Bearer {token}"}

    def status_at_second() -> int:
        # A fresh connection each time, so the calls spread over the second server's workers.
        return httpx.get(f"{second}/v1/datasets/d", headers=headers, timeout=10).status_code

    # Before the revocation commits, every worker of the second server admits the key (and
    # caches it).
    assert [status_at_second() for _ in range(20)] == [200] * 20
    assert admin.delete(f"/v1/keys/{token.split('_')[1]}").status_code == 200
    committed_by = time.monotonic()  # the revocation committed before its answer came back
    # Poll the second server for the bound and a little more. A call sent after
    # committed_by + bound reaches a worker whose entry, stamped before a read that saw the key
    # active (so before the commit), has run out: it must be refused, with no slack.
    observed: list[tuple[float, int]] = []
    deadline = committed_by + BOUND_S + 1.0
    while time.monotonic() < deadline:
        sent = time.monotonic() - committed_by
        observed.append((sent, status_at_second()))
    assert {status for _, status in observed} <= {200, 401}, observed
    late = [(sent, status) for sent, status in observed if sent > BOUND_S]
    assert len(late) >= 5, f"too few calls after the bound to judge: {observed}"
    assert all(status == 401 for _, status in late), late


def test_one_request_refreshes_a_key_half_its_bound_old_while_the_others_use_the_cache(
    database: Database,
) -> None:
    """Refresh ahead: past half the bound exactly one caller claims the key's lookup (the rest
    go on from the entry, which is still within the bound); the lookup renews the entry and
    ends the claim; a key found revoked by it leaves the cache at once."""
    clock = Clock()
    cache = keys.KeyCache(1.0, clock=clock)
    key_id, token = _issued(database)
    assert keys.authenticate(database, token, None, cache).id == key_id
    clock.now += 0.499
    assert not cache.claim_refresh(key_id)  # young: nobody refreshes
    clock.now += 0.001
    assert cache.claim_refresh(key_id)
    assert not cache.claim_refresh(key_id)  # claimed once: the others use the cache
    with key_lookups(database) as lookups:
        assert keys.authenticate(database, token, None, cache).id == key_id
    assert lookups == []
    with key_lookups(database) as lookups:
        assert keys.authenticate(database, token, None, cache, refresh=True).id == key_id
    assert len(lookups) == 1
    clock.now += 0.9  # the entry was renewed by the refresh: 0.9 s old, not 1.4
    with key_lookups(database) as lookups:
        assert keys.authenticate(database, token, None, cache).id == key_id
    assert lookups == []
    assert cache.claim_refresh(key_id)  # the claim ended with the lookup
    with database.write() as session:  # revoked by another process
        keys.revoke(session, key_id)
        session.commit()
    with pytest.raises(Unauthorized, match="revoked"):
        keys.authenticate(database, token, None, cache, refresh=True)
    with key_lookups(database) as lookups, pytest.raises(Unauthorized, match="revoked"):
        keys.authenticate(database, token, None, cache)  # gone from the cache at once
    assert len(lookups) == 1
    assert not cache.claim_refresh(key_id)  # no entry, nothing to refresh


def test_under_load_the_key_is_read_about_twice_per_bound_not_by_every_request(
    migrated_url: str,
) -> None:
    """Through the app, with requests in flight together: over one second the key is read
    about once per half bound, not by every request in flight each time its entry runs out."""
    with _trainer(migrated_url, 0.2) as (db, trainer):
        assert trainer.get("/v1/datasets/d").status_code == 200

        def loop() -> int:
            count, started = 0, time.monotonic()
            while time.monotonic() - started < 1.0:
                assert trainer.get("/v1/datasets/d").status_code == 200
                count += 1
            return count

        with key_lookups(db) as lookups, ThreadPoolExecutor(max_workers=16) as pool:
            requests = sum(pool.map(lambda _: loop(), range(16)))
        # Half bounds in a second: 10; a read that ends late may let one entry run out.
        assert 1 <= len(lookups) <= 15 < requests, (len(lookups), requests)
