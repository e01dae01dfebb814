"""Stored request fingerprints give nothing away, old records still replay, and every worker
and process on one database keys them with the same secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from service import secret_key
from service.api.schemas import ReleaseCreate
from service.settings import Settings
from service.storage.database import Database
from service.storage.models import IdempotencyRecord
from tests.service.conftest import ADMIN_KEY, ROOT, Api, LiveServer

SECRET_COUNT = 7313
REPLAYED = "Idempotent-Replayed"


def _release(count: int) -> dict[str, Any]:
    return {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 1.0, "values": [count]}


def _old_recipe(path: str, body: dict[str, Any]) -> str:
    """The fingerprint as the service wrote it before it was keyed: SHA-256, hex."""
    dumped = ReleaseCreate.model_validate(body).model_dump(mode="json")
    fingerprint = {"method": "POST", "path": path, "query": [], "body": dumped}
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _stored(database: Database, key: str) -> IdempotencyRecord:
    with database.read() as session:
        record = session.execute(
            select(IdempotencyRecord).where(IdempotencyRecord.key == key)
        ).scalar_one()
        session.expunge(record)
        return record


def _trainer(api: Api, dataset_id: str) -> Api:
    api.create_dataset(dataset_id, 100.0)
    return api.as_key(api.new_key("trainer"))


def test_stored_fingerprint_of_released_values_cannot_be_recomputed(
    api: Api, database: Database
) -> None:
    trainer = _trainer(api, "counts")
    path = "/v1/datasets/counts/releases"
    body = _release(SECRET_COUNT)
    sent = json.dumps(body).encode()
    response = trainer.client.post(
        path,
        content=sent,
        headers=trainer.headers({"Idempotency-Key": "count-1", "Content-Type": "application/json"}),
    )
    assert response.status_code == 201, response.text
    stored = _stored(database, "count-1").request_hash
    assert stored.startswith("hmac-sha256:") and len(stored) <= 64

    # What an attacker with the database would try: the old recipe and plain hashes over the
    # body, for every candidate count; none may reproduce the stored fingerprint.
    digest_text = stored.removeprefix("hmac-sha256:")
    for count in range(10_000):
        candidate_body = _release(count)
        raw = json.dumps(candidate_body).encode()
        canonical = json.dumps(candidate_body, sort_keys=True).encode()
        recipes = [_old_recipe(path, candidate_body)]
        for data in (raw, canonical, str(count).encode()):
            for name in ("sha256", "sha512", "blake2b", "md5"):
                digest = hashlib.new(name, data).digest()
                recipes += [digest.hex(), base64.urlsafe_b64encode(digest).rstrip(b"=").decode()]
        assert stored not in recipes and digest_text not in recipes, count
    # With the server's secret (kept outside the database) the stored value is reproduced:
    # only the secret is missing. (The legacy test below shows the old recipe is exact.)
    secret = secret_key.load(Settings())
    dumped = ReleaseCreate.model_validate(body).model_dump(mode="json")
    canonical = json.dumps(
        {"method": "POST", "path": path, "query": [], "body": dumped}, sort_keys=True
    ).encode()
    mac = hmac.new(secret, canonical, hashlib.sha256).digest()
    assert digest_text == base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_a_legacy_record_still_replays_and_still_conflicts(api: Api, database: Database) -> None:
    trainer = _trainer(api, "legacy")
    path = "/v1/datasets/legacy/releases"
    headers = {"Idempotency-Key": "legacy-1"}
    first = trainer.post(path, _release(12), headers=headers)
    assert first.status_code == 201, first.text
    # The record as the code before keyed fingerprints wrote it: the unkeyed SHA-256 (hex).
    with database.write() as session:
        session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.key == "legacy-1")
            .values(request_hash=_old_recipe(path, _release(12)))
        )
    seq = api.get("/v1/datasets/legacy").json()["ledger_seq"]

    again = trainer.post(path, _release(12), headers=headers)
    assert again.status_code == 201 and again.headers.get(REPLAYED) == "true", again.text
    assert again.json() == first.json()
    different = trainer.post(path, _release(13), headers=headers)
    assert different.status_code == 422, different.text
    assert different.json()["code"] == "idempotency_conflict"
    assert api.get("/v1/datasets/legacy").json()["ledger_seq"] == seq
    assert _stored(database, "legacy-1").request_hash == _old_recipe(path, _release(12))


def test_two_processes_share_one_secret(live_server: LiveServer, database: Database) -> None:
    first, second = live_server(), live_server()
    with httpx.Client(base_url=first, timeout=30) as a, httpx.Client(base_url=second) as b:
        trainer_key = _trainer(Api(a, ADMIN_KEY), "shared").key
        path = "/v1/datasets/shared/releases"
        headers = {"Idempotency-Key": "across"}
        made = Api(a, trainer_key).post(path, _release(5), headers=headers)
        assert made.status_code == 201, made.text
        replay = Api(b, trainer_key).post(path, _release(5), headers=headers)
        assert replay.status_code == 201 and replay.headers.get(REPLAYED) == "true", replay.text
        assert replay.json() == made.json()
        other = Api(b, trainer_key).post(path, _release(6), headers=headers)
        assert other.json()["code"] == "idempotency_conflict", other.text
    assert _stored(database, "across").request_hash.startswith("hmac-sha256:")


def test_two_workers_share_one_secret(live_server: LiveServer) -> None:
    base = live_server(workers=2)
    with httpx.Client(base_url=base, timeout=30) as http:
        trainer_key = _trainer(Api(http, ADMIN_KEY), "workers").key
    path = "/v1/datasets/workers/releases"
    # Each retry on its own connection: the kernel spreads them over both workers, so with
    # two secrets about half of them would conflict.
    for n in range(4):
        headers = {"Idempotency-Key": f"w-{n}"}
        responses = []
        for _ in range(6):
            with httpx.Client(base_url=base, timeout=30) as http:
                responses.append(Api(http, trainer_key).post(path, _release(n), headers=headers))
        assert [r.status_code for r in responses] == [201] * 6, [r.text for r in responses]
        assert [r.headers.get(REPLAYED) for r in responses[1:]] == ["true"] * 5
        assert all(r.json() == responses[0].json() for r in responses)


def _load_after(barrier: Any, path: str, results: Any) -> None:
    barrier.wait(timeout=30)
    results.put(secret_key.load(Settings(secret_key_file=path)).hex())


def test_racing_processes_create_one_key_file(tmp_path: Path) -> None:
    path = tmp_path / "racing.key"
    # fork: several processes released at once, as uvicorn's workers start (spawn would cost
    # seconds of imports each on a busy machine).
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    racers = [
        context.Process(target=_load_after, args=(barrier, str(path), results)) for _ in range(4)
    ]
    for racer in racers:
        racer.start()
    keys = [results.get(timeout=60) for _ in racers]
    for racer in racers:
        racer.join(timeout=30)
        assert racer.exitcode == 0
    assert len(set(keys)) == 1 and len(bytes.fromhex(keys[0])) == 32
    assert path.read_text().strip() == keys[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["racing.key"]


def test_the_setting_wins_and_no_file_is_written(tmp_path: Path) -> None:
    path = tmp_path / "unused.key"
    settings = Settings(secret_key="k" * 32, secret_key_file=str(path))
    assert secret_key.load(settings) == b"k" * 32
    assert not path.exists()


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        ("not hex at all\n", 0o600, "64 hex digits"),
        ("ab" * 16 + "\n", 0o600, "64 hex digits"),
        ("ab" * 32 + "\n", 0o644, "chmod 600"),
        (None, 0o700, "cannot read"),
    ],
)
def test_a_bad_key_file_is_refused_with_a_clear_message(
    tmp_path: Path, content: str | None, mode: int, message: str
) -> None:
    path = tmp_path / "bad.key"
    if content is None:
        path.mkdir()  # unreadable as a file, whoever runs the suite (root reads any mode)
    else:
        path.write_text(content)
    path.chmod(mode)
    with pytest.raises(secret_key.SecretKeyError, match=message):
        secret_key.load(Settings(secret_key_file=str(path)))


def test_serve_refuses_to_start_on_a_bad_key_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("ab" * 32 + "\n")
    path.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(
        LEDGER_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}", LEDGER_SECRET_KEY_FILE=str(path)
    )
    served = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert served.returncode == 2, served.stderr
    assert f"the secret key file {path} is accessible to other users" in served.stderr
    assert not (tmp_path / "x.db").exists()


def test_a_short_secret_setting_is_refused() -> None:
    with pytest.raises(secret_key.SecretKeyError, match="at least 32 characters"):
        secret_key.load(Settings(secret_key="short"))
