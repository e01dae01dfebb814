"""The role matrix: every endpoint × every kind of caller gets exactly the answer its role allows.

401 for no, malformed, unknown or revoked keys; 403 for a valid key without the role; 404 for a
scoped key touching a dataset (or its runs) outside its scope, with the very body a caller gets
for a dataset that does not exist; the success status otherwise. Refused writes change nothing.

The app, its database and the callers' keys are built once per backend (module scope) so that
the few hundred cases stay fast; each case makes its own fresh run, release or key when it needs
one and compares what it may touch before and after.
"""

from __future__ import annotations

import itertools
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.app import create_app
from service.settings import Settings
from service.storage import migrate
from service.storage.database import Database
from tests.conftest import require_postgres
from tests.service.conftest import ADMIN_KEY, Api

TARGET = "roles-target"  # the dataset every dataset-bound case is aimed at
OTHER = "roles-other"  # the dataset the "other scope" keys are limited to
ABSENT = "roles-absent"  # never created: what "does not exist" looks like
ABSENT_RUN = "run_0000000000000000deadbeef"
# Cheap to account (no subsampling): the matrix is about who may call, not about the arithmetic.
PLAN = {"sample_rate": 1.0, "steps_per_epoch": 1, "epochs": 3, "noise_multiplier": 50.0}
RELEASE = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.001}
PROBLEM_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found"}
KEY_FIELDS = {"id", "name", "role", "datasets", "created_at", "revoked_at"}
_serial = itertools.count(1)


@contextmanager
def served_app(backend: str, directory: Path) -> Iterator[TestClient]:
    """The real app on a fresh migrated database of `backend` (dropped afterwards)."""
    admin_engine = None
    if backend == "sqlite":
        url = f"sqlite:///{os.path.join(directory, 'ledger.db')}"
    else:
        postgres_url = require_postgres()
        name = f"ledger_test_{uuid.uuid4().hex[:16]}"
        admin_engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with admin_engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    try:
        database = Database(url)
        try:
            migrate.upgrade(database.write_engine)
        finally:
            database.dispose()
        settings = Settings(database_url=url, admin_key=ADMIN_KEY)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield client
    finally:
        if admin_engine is not None:
            with admin_engine.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin_engine.dispose()


@dataclass(frozen=True)
class Caller:
    """A kind of caller: its role (None: not authenticated) and the dataset its key is scoped to."""

    name: str
    role: str | None
    scope: str | None = None


CALLERS = (
    Caller("admin_key", "admin"),
    Caller("bootstrap_admin", "admin"),
    Caller("trainer", "trainer"),
    Caller("trainer_scoped", "trainer", TARGET),
    Caller("trainer_other_scope", "trainer", OTHER),
    Caller("auditor", "auditor"),
    Caller("auditor_scoped", "auditor", TARGET),
    Caller("auditor_other_scope", "auditor", OTHER),
    Caller("no_header", None),
    Caller("basic_scheme", None),
    Caller("bearer_without_key", None),
    Caller("unknown_key", None),
    Caller("wrong_secret", None),
    Caller("revoked_key", None),
)


@dataclass
class World:
    """One backend's app with a target dataset, an active run and a key per caller."""

    admin: Api  # the bootstrap admin, for setting up and for looking behind a refusal
    authorization: dict[str, dict[str, str]]
    key_ids: dict[str, str]  # caller → its key's id, and a "spare" key refused revocations aim at
    run_id: str = ""  # an active run on the target dataset
    charge_seq: int = 0  # a charge on the target dataset that refused voids aim at

    def call(
        self, caller: str, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> httpx.Response:
        """Send one request as `caller`, with its Authorization header exactly as it sends it."""
        headers = self.authorization[caller]
        return self.admin.client.request(method, path, json=body, headers=headers, **kwargs)

    def dataset(self, dataset_id: str = TARGET) -> dict[str, Any]:
        response = self.admin.get(f"/v1/datasets/{dataset_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def run(self, run_id: str) -> dict[str, Any]:
        response = self.admin.get(f"/v1/runs/{run_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def new_run(self) -> str:
        response = self.admin.post(f"/v1/datasets/{TARGET}/runs", PLAN)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def new_charge(self) -> int:
        response = self.admin.post(f"/v1/datasets/{TARGET}/releases", RELEASE)
        assert response.status_code == 201, response.text
        return int(response.json()["ledger_seq"])

    def new_key_id(self) -> str:
        response = self.admin.post("/v1/keys", {"role": "trainer", "name": "to revoke"})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def keys(self) -> list[dict[str, Any]]:
        response = self.admin.get("/v1/keys", params={"limit": 1000})
        assert response.status_code == 200, response.text
        return list(response.json()["data"])

    def dataset_ids(self) -> list[str]:
        response = self.admin.get("/v1/datasets", params={"limit": 1000})
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()["data"]]


def build_world(admin: Api) -> World:
    """The datasets, keys (one per caller, one of them revoked) and a shared active run."""
    for dataset_id in (TARGET, OTHER):
        admin.create_dataset(dataset_id, 100.0)
    keys: dict[str, str] = {}
    key_ids: dict[str, str] = {}
    for caller in CALLERS:
        if caller.role is None and caller.name != "revoked_key":
            continue
        role = caller.role or "trainer"
        scope = [caller.scope] if caller.scope else None
        response = admin.post("/v1/keys", {"role": role, "datasets": scope, "name": caller.name})
        assert response.status_code == 201, response.text
        keys[caller.name] = response.json()["key"]
        key_ids[caller.name] = response.json()["id"]
    revoked = admin.delete(f"/v1/keys/{key_ids['revoked_key']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"], revoked.text
    trainer_id = keys["trainer"].split("_")[1]
    bearer = {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}
    authorization = {
        **bearer,
        "bootstrap_admin": {"Authorization": f"Bearer {ADMIN_KEY}"},
        "no_header": {},
        "basic_scheme": {"Authorization": "Basic x"},
        "bearer_without_key": {"Authorization": "Bearer"},
        "unknown_key": {
            "Authorization": f"Bearer pl_key{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
        },
        "wrong_secret": {"Authorization": f"Bearer pl_{trainer_id}_{secrets.token_urlsafe(32)}"},
    }
    world = World(admin, authorization, key_ids)
    world.key_ids["spare"] = world.new_key_id()
    world.run_id = world.new_run()
    world.charge_seq = world.new_charge()
    return world


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One app per backend for the whole module."""
    with served_app(request.param, tmp_path_factory.mktemp("roles")) as client:
        yield build_world(Api(client, ADMIN_KEY))


@dataclass
class Call:
    """One prepared request: what to send, what it is aimed at, and what it must not change."""

    method: str
    path: str
    body: Any = None
    params: dict[str, Any] | None = None
    target: str = TARGET  # the id in `path` that "does not exist" replaces
    absent: str = ABSENT
    observe: Callable[[], Any] = lambda: None  # the state a refused write must leave alone
    check: Callable[[httpx.Response, Any], None] = lambda response, before: None

    @property
    def absent_path(self) -> str:
        return self.path.replace(self.target, self.absent)


@dataclass(frozen=True)
class Endpoint:
    """An operation: who may call it and how to prepare a fresh request for a caller."""

    name: str
    prepare: Callable[[World, bool], Call]  # (world, whether the call is expected to succeed)
    roles: frozenset[str] = frozenset()  # besides admin; ignored when public
    success: int = 200
    scoped: bool = False  # aimed at one dataset: scope applies
    public: bool = False  # no key needed (health)

    def expected(self, caller: Caller) -> int:
        if self.public:
            return self.success
        if caller.role is None:
            return 401
        if caller.role != "admin" and caller.role not in self.roles:
            return 403
        if self.scoped and caller.scope not in (None, TARGET):
            return 404
        return self.success


ANY_ROLE = frozenset({"trainer", "auditor"})
TRAINER = frozenset({"trainer"})
AUDITOR = frozenset({"auditor"})


def _dataset_write(world: World, call: Call) -> Call:
    call.observe = lambda: (world.dataset(),)
    return call


def _run_write(world: World, run_id: str, call: Call) -> Call:
    call.target = run_id
    call.absent = ABSENT_RUN
    call.observe = lambda: (world.dataset(), world.run(run_id))
    return call


def create_dataset(world: World, succeeds: bool) -> Call:
    new_id = f"roles-new-{next(_serial)}"

    def check(response: httpx.Response, before: Any) -> None:
        assert response.json()["id"] == new_id
        assert world.dataset_ids() == sorted([*before, new_id])

    body = {"id": new_id, "epsilon_cap": 1.0, "delta": 1e-5}
    return Call("POST", "/v1/datasets", body, observe=world.dataset_ids, check=check)


def list_datasets(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        assert {TARGET, OTHER} & {d["id"] for d in response.json()["data"]}

    return Call("GET", "/v1/datasets", params={"limit": 1000}, check=check)


def get_dataset(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        assert response.json() == world.dataset()

    return Call("GET", f"/v1/datasets/{TARGET}", check=check)


def update_dataset(world: World, succeeds: bool) -> Call:
    description = f"changed by case {next(_serial)}"

    def check(response: httpx.Response, before: Any) -> None:
        assert response.json()["description"] == description
        assert response.json()["ledger_seq"] == before[0]["ledger_seq"] + 1

    call = Call("PATCH", f"/v1/datasets/{TARGET}", {"description": description}, check=check)
    return _dataset_write(world, call)


def create_run(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        body = response.json()
        assert body["status"] == "active" and body["dataset_id"] == TARGET
        assert body["dataset"]["ledger_seq"] == before[0]["ledger_seq"] + 1
        assert body["dataset"]["epsilon_reserved"] > before[0]["epsilon_reserved"]

    call = Call("POST", f"/v1/datasets/{TARGET}/runs", PLAN, check=check)
    return _dataset_write(world, call)


def list_runs(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        assert world.run_id in {r["id"] for r in response.json()["data"]}

    return Call("GET", f"/v1/datasets/{TARGET}/runs", params={"limit": 1000}, check=check)


def get_run(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        assert response.json()["id"] == world.run_id

    return Call(
        "GET", f"/v1/runs/{world.run_id}", target=world.run_id, absent=ABSENT_RUN, check=check
    )


def reserve_epoch(world: World, succeeds: bool) -> Call:
    run_id = world.new_run() if succeeds else world.run_id

    def check(response: httpx.Response, before: Any) -> None:
        body = response.json()
        assert body["run_id"] == run_id and body["epoch"] == 1
        assert body["dataset"]["ledger_seq"] == before[0]["ledger_seq"] + 1
        assert body["dataset"]["epsilon_spent"] > before[0]["epsilon_spent"]

    return _run_write(world, run_id, Call("POST", f"/v1/runs/{run_id}/epochs", check=check))


def finish_run(action: str, status: str) -> Callable[[World, bool], Call]:
    def prepare(world: World, succeeds: bool) -> Call:
        run_id = world.new_run() if succeeds else world.run_id

        def check(response: httpx.Response, before: Any) -> None:
            body = response.json()
            assert body["id"] == run_id and body["status"] == status
            assert body["dataset"]["ledger_seq"] == before[0]["ledger_seq"] + 1
            assert body["dataset"]["epsilon_reserved"] < before[0]["epsilon_reserved"]

        return _run_write(world, run_id, Call("POST", f"/v1/runs/{run_id}/{action}", check=check))

    return prepare


def create_release(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        body = response.json()
        assert body["ledger_seq"] == before[0]["ledger_seq"] + 1
        assert body["dataset"]["epsilon_spent"] > before[0]["epsilon_spent"]

    call = Call("POST", f"/v1/datasets/{TARGET}/releases", RELEASE, check=check)
    return _dataset_write(world, call)


def list_ledger(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        entries = response.json()["data"]
        assert entries[0]["kind"] == "dataset_created" and entries[0]["dataset_id"] == TARGET

    return Call("GET", f"/v1/datasets/{TARGET}/ledger", check=check)


def export_ledger_csv(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        assert response.headers["content-type"].startswith("text/csv")
        lines = response.text.splitlines()
        assert lines[0].startswith("seq,created_at,kind")
        assert lines[1].startswith("1,") and ",dataset_created," in lines[1]

    return Call("GET", f"/v1/datasets/{TARGET}/ledger", params={"format": "csv"}, check=check)


def verify_ledger(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        assert response.json()["ok"] is True

    return Call("GET", f"/v1/datasets/{TARGET}/ledger/verify", check=check)


def void_charge(world: World, succeeds: bool) -> Call:
    seq = world.new_charge() if succeeds else world.charge_seq

    def check(response: httpx.Response, before: Any) -> None:
        body = response.json()
        assert body["kind"] == "void" and body["voids_seq"] == seq
        assert body["seq"] == before[0]["ledger_seq"] + 1

    body = {"reason": "role matrix"}
    call = Call("POST", f"/v1/datasets/{TARGET}/ledger/{seq}/void", body, check=check)
    return _dataset_write(world, call)


def create_key(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        created = response.json()
        assert created["role"] == "auditor" and created["key"].startswith("pl_")
        assert len(world.keys()) == len(before) + 1

    return Call("POST", "/v1/keys", {"role": "auditor"}, observe=world.keys, check=check)


def list_keys(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        listed = response.json()["data"]
        # Admins and auditors alike see the unscoped keys; exactly who sees which scoped key is
        # test_auditors_list_the_keys_that_may_act_on_their_datasets.
        assert world.key_ids["admin_key"] in {k["id"] for k in listed}
        assert all(set(k) == KEY_FIELDS for k in listed)  # never the secret nor its hash

    return Call("GET", "/v1/keys", params={"limit": 1000}, check=check)


def revoke_key(world: World, succeeds: bool) -> Call:
    key_id = world.new_key_id() if succeeds else world.key_ids["spare"]

    def check(response: httpx.Response, before: Any) -> None:
        assert response.json()["id"] == key_id and response.json()["revoked_at"]

    return Call("DELETE", f"/v1/keys/{key_id}", observe=world.keys, check=check)


def plan_epsilon(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        assert 0 < response.json()["epsilon"] < 10

    body = {"sample_rate": 0.01, "noise_multiplier": 1.0, "steps": 100, "delta": 1e-5}
    return Call("POST", "/v1/accountant/epsilon", body, check=check)


def plan_noise_multiplier(world: World, succeeds: bool) -> Call:
    def check(response: httpx.Response, before: Any) -> None:
        assert response.json()["noise_multiplier"] > 0
        assert response.json()["epsilon"] <= 2.0

    body = {"sample_rate": 1.0, "steps": 10, "target_epsilon": 2.0, "delta": 1e-5}
    return Call("POST", "/v1/accountant/noise-multiplier", body, check=check)


def health(path: str) -> Callable[[World, bool], Call]:
    def prepare(world: World, succeeds: bool) -> Call:
        def check(response: httpx.Response, before: Any) -> None:
            assert response.json()["status"] == "ok"

        return Call("GET", path, check=check)

    return prepare


ENDPOINTS = (
    Endpoint("create_dataset", create_dataset, success=201),
    Endpoint("list_datasets", list_datasets, ANY_ROLE),
    Endpoint("get_dataset", get_dataset, ANY_ROLE, scoped=True),
    Endpoint("update_dataset", update_dataset, scoped=True),
    Endpoint("create_run", create_run, TRAINER, 201, scoped=True),
    Endpoint("list_runs", list_runs, ANY_ROLE, scoped=True),
    Endpoint("get_run", get_run, ANY_ROLE, scoped=True),
    Endpoint("reserve_epoch", reserve_epoch, TRAINER, 201, scoped=True),
    Endpoint("complete_run", finish_run("complete", "completed"), TRAINER, scoped=True),
    Endpoint("abort_run", finish_run("abort", "aborted"), TRAINER, scoped=True),
    Endpoint("create_release", create_release, TRAINER, 201, scoped=True),
    Endpoint("list_ledger", list_ledger, AUDITOR, scoped=True),
    Endpoint("export_ledger_csv", export_ledger_csv, AUDITOR, scoped=True),
    Endpoint("verify_ledger", verify_ledger, AUDITOR, scoped=True),
    Endpoint("void_charge", void_charge, success=201, scoped=True),
    Endpoint("create_key", create_key, success=201),
    Endpoint("list_keys", list_keys, AUDITOR),
    Endpoint("revoke_key", revoke_key),
    Endpoint("plan_epsilon", plan_epsilon, ANY_ROLE),
    Endpoint("plan_noise_multiplier", plan_noise_multiplier, ANY_ROLE),
    Endpoint("livez", health("/livez"), public=True),
    Endpoint("readyz", health("/readyz"), public=True),
)
MATRIX = [
    pytest.param(endpoint, caller, id=f"{endpoint.name}-{caller.name}")
    for endpoint in ENDPOINTS
    for caller in CALLERS
]


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """A problem+json answer of `status` with its stable code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    code = PROBLEM_CODES[status]
    assert body["status"] == status and body["code"] == code
    assert body["type"] == f"urn:privacy-ledger:problem:{code}"
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    return body


@pytest.mark.parametrize(("endpoint", "caller"), MATRIX)
def test_role_matrix(world: World, endpoint: Endpoint, caller: Caller) -> None:
    """Exactly the allowed answer; a refused write leaves what it aimed at untouched."""
    expected = endpoint.expected(caller)
    call = endpoint.prepare(world, expected < 400)
    before = call.observe()
    response = world.call(caller.name, call.method, call.path, call.body, params=call.params)
    if expected < 400:
        assert response.status_code == expected, response.text
        call.check(response, before)
        return
    refusal = assert_problem(response, expected)
    assert call.observe() == before
    if expected == 404:
        # Out of scope reads exactly like "does not exist": the same role without a scope, asking
        # for a dataset (or run) that was never created, gets the same answer with that id.
        # (The callers "trainer" and "auditor" are those unscoped keys.)
        assert caller.role is not None
        missing = world.call(
            caller.role, call.method, call.absent_path, call.body, params=call.params
        )
        assert_problem(missing, 404)
        assert {**refusal, "detail": refusal["detail"].replace(call.target, call.absent)} == (
            missing.json()
        )


def test_scoped_keys_list_only_their_datasets(world: World) -> None:
    """A scoped key's listing holds its datasets and nothing else; unscoped keys see them all."""

    def listed(caller: str, **params: Any) -> list[str]:
        response = world.call(caller, "GET", "/v1/datasets", params={"limit": 1000, **params})
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()["data"]]

    everything = world.dataset_ids()
    assert {TARGET, OTHER} <= set(everything)
    assert listed("trainer_scoped") == [TARGET]
    assert listed("auditor_scoped") == [TARGET]
    assert listed("trainer_other_scope") == [OTHER]
    assert listed("auditor_other_scope") == [OTHER]
    assert listed("trainer") == everything
    assert listed("auditor") == everything
    # Paging never reaches past the scope either.
    assert listed("trainer_scoped", limit=1) == [TARGET]
    assert listed("trainer_scoped", after=TARGET) == []
    page = world.call("trainer_other_scope", "GET", "/v1/datasets", params={"limit": 1})
    assert page.json() == {"data": [world.dataset(OTHER)], "has_more": False}


def test_scoped_keys_do_not_see_runs_out_of_scope(world: World) -> None:
    """A run of an out-of-scope dataset is not found by id, whoever asks from outside."""
    for caller in ("trainer_other_scope", "auditor_other_scope"):
        response = world.call(caller, "GET", f"/v1/runs/{world.run_id}")
        assert assert_problem(response, 404)["detail"] == f"run {world.run_id!r} not found"
        listing = world.call(caller, "GET", f"/v1/datasets/{OTHER}/runs")
        assert listing.status_code == 200 and listing.json()["data"] == [], listing.text


def test_auditors_list_the_keys_that_may_act_on_their_datasets(world: World) -> None:
    """An auditor reads the metadata of every key that may act on a dataset in its scope: keys
    sharing a dataset with it and unscoped keys; each scope shown only within its own."""

    def listed(caller: str, **params: Any) -> dict[str, Any]:
        response = world.call(caller, "GET", "/v1/keys", params={"limit": 1000, **params})
        assert response.status_code == 200, response.text
        return {k["id"]: k for k in response.json()["data"]}

    admin_view = world.keys()
    everything = {k["id"]: k for k in admin_view}
    assert listed("auditor") == listed("admin_key") == everything
    ids = world.key_ids
    unscoped = {i for i, k in everything.items() if k["datasets"] is None}
    assert {ids["trainer"], ids["auditor"], ids["admin_key"], ids["revoked_key"]} <= unscoped
    for caller, mine, theirs in (
        ("auditor_scoped", TARGET, "trainer_other_scope"),
        ("auditor_other_scope", OTHER, "trainer_scoped"),
    ):
        seen = listed(caller)
        in_scope = {i for i, k in everything.items() if mine in (k["datasets"] or [mine])}
        assert set(seen) == in_scope
        assert ids[theirs] not in seen and ids[caller] in seen
        # Metadata as the admin sees it (revocations included), the scope cut to the auditor's.
        for key_id, key in seen.items():
            expected = everything[key_id]
            cut = None if expected["datasets"] is None else [mine]
            assert key == {**expected, "datasets": cut}
        assert (
            seen[ids["revoked_key"]]["revoked_at"] == everything[ids["revoked_key"]]["revoked_at"]
        )
        # Paging walks the same keys, in id order, and never past the scope.
        first = world.call(caller, "GET", "/v1/keys", params={"limit": 1}).json()
        assert [k["id"] for k in first["data"]] == sorted(in_scope)[:1] and first["has_more"]
        after = sorted(in_scope)[-1]
        assert world.call(caller, "GET", "/v1/keys", params={"after": after}).json() == {
            "data": [],
            "has_more": False,
        }
    # A key scoped to both datasets shows each auditor only its own part.
    both = world.admin.post("/v1/keys", {"role": "trainer", "datasets": [TARGET, OTHER]})
    assert both.status_code == 201, both.text
    assert listed("auditor_scoped")[both.json()["id"]]["datasets"] == [TARGET]
    assert listed("auditor_other_scope")[both.json()["id"]]["datasets"] == [OTHER]
    assert listed("auditor")[both.json()["id"]]["datasets"] == sorted([TARGET, OTHER])


def test_admin_keys_cannot_be_scoped(world: World) -> None:
    """Only trainer and auditor keys take a scope: a "scoped" admin could mint itself an unscoped
    admin key (POST /v1/keys) or create datasets, so the scope would mean nothing."""
    before = world.keys()
    response = world.admin.post("/v1/keys", {"role": "admin", "datasets": [TARGET]})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_error"
    assert world.keys() == before


def test_revoked_key_is_refused_from_the_next_request_on(world: World) -> None:
    """Revocation takes effect at once, and only for the key revoked."""
    created = world.admin.post("/v1/keys", {"role": "auditor", "datasets": [TARGET]})
    assert created.status_code == 201, created.text
    auditor = world.admin.as_key(created.json()["key"])
    assert auditor.get(f"/v1/datasets/{TARGET}/ledger/verify").status_code == 200
    revoked = world.admin.delete(f"/v1/keys/{created.json()['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"], revoked.text
    refused = auditor.get(f"/v1/datasets/{TARGET}/ledger/verify")
    assert assert_problem(refused, 401)["detail"] == "this API key has been revoked"
    assert world.call("auditor_scoped", "GET", f"/v1/datasets/{TARGET}").status_code == 200
    # Revoking again is harmless and keeps the first revocation time.
    again = world.admin.delete(f"/v1/keys/{created.json()['id']}")
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
