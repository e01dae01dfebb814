"""Schemathesis against the service's own OpenAPI document, in process, on every backend.

Every operation gets generated requests, valid and invalid (Schemathesis' coverage cases, then a
bounded, derandomized fuzzing run), sent with the bootstrap admin key so they reach the handlers.
Every answer must be no 5xx, have a status the operation declares, and carry a declared media
type and a body that matches the declared schema.

A dataset with active runs, a charge and a spare key exist up front, and the fuzzing aims its
path parameters at them half of the time (and sends a valid plan or release half of the time,
which random bodies rarely are), so 2xx answers are checked too, not only refusals. Afterwards
each operation must have had at least one 2xx answer (else the run tested only refusals, e.g.
if authentication silently failed), and every dataset's ledger must still verify.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.types import ASGIApp

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ADMIN_KEY, Api
from tests.service.test_roles import served_app

DATASET = "fuzz-target"  # runs, releases, the ledger and voids are aimed here
PATCHED = "fuzz-patched"  # PATCH is aimed here: a frozen or zero cap must not starve the rest
PLAN = {"sample_rate": 0.01, "steps_per_epoch": 10, "epochs": 3, "noise_multiplier": 5.0}
RELEASE = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.1}
# Bodies that pass the cross-field rules random bodies rarely meet (exactly one of ε or σ, …).
VALID_BODIES: dict[str, list[dict[str, Any]]] = {
    "create_run": [
        PLAN,
        {"sample_rate": 0.02, "steps_per_epoch": 5, "epochs": 2, "target_epsilon": 2.0},
    ],
    "create_release": [
        RELEASE,
        {"mechanism": "gaussian", "epsilon": 0.5, "delta": 1e-6, "values": [1.0, -2.5]},
        {"mechanism": "pure_dp", "epsilon": 0.2},
    ],
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Where the fuzzing aims, by path parameter, in the current backend's app (filled by `world`;
# the generation hooks below read them while the tests run). Operations that change their target
# for good get their own, so the others keep theirs: PATCH may freeze its dataset or zero its
# cap, complete and abort each end a run.
TARGETS: dict[str, Any] = {}
OWN_TARGETS: dict[str, dict[str, Any]] = {}


@dataclass
class World:
    """One backend's app, and its bootstrap admin for looking behind the fuzzing's back."""

    app: ASGIApp
    admin: Api

    def assert_ledgers_verify(self) -> None:
        listed = self.admin.get("/v1/datasets", params={"limit": 1000})
        assert listed.status_code == 200, listed.text
        for dataset in listed.json()["data"]:
            verified = self.admin.get(f"/v1/datasets/{dataset['id']}/ledger/verify")
            assert verified.status_code == 200, verified.text
            assert verified.json()["ok"] is True, (dataset["id"], verified.json())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One app per backend for the whole module, with the objects the fuzzing aims at."""
    with served_app(request.param, tmp_path_factory.mktemp("schemathesis")) as client:
        admin = Api(client, ADMIN_KEY)
        admin.create_dataset(DATASET, 1000.0)
        admin.create_dataset(PATCHED, 10.0)
        planned = [admin.post(f"/v1/datasets/{DATASET}/runs", PLAN) for _ in range(3)]
        assert all(run.status_code == 201 for run in planned), [run.text for run in planned]
        run_id, to_complete, to_abort = (run.json()["id"] for run in planned)
        charge = admin.post(f"/v1/datasets/{DATASET}/releases", RELEASE)
        assert charge.status_code == 201, charge.text
        key = admin.post("/v1/keys", {"role": "trainer", "name": "to revoke"})
        assert key.status_code == 201, key.text
        TARGETS.update(
            dataset_id=DATASET,
            run_id=run_id,
            seq=charge.json()["ledger_seq"],
            key_id=key.json()["id"],
        )
        OWN_TARGETS.update(
            update_dataset={"dataset_id": PATCHED},
            complete_run={"run_id": to_complete},
            abort_run={"run_id": to_abort},
        )
        try:
            yield World(client.app, admin)
        finally:
            TARGETS.clear()
            OWN_TARGETS.clear()


@pytest.fixture
def answers(world: World) -> Iterator[list[int]]:
    """The statuses one operation's requests got; checked when its examples are done."""
    statuses: list[int] = []
    yield statuses
    assert any(200 <= status < 300 for status in statuses), (
        f"no request succeeded, only {sorted(set(statuses))}: the run tested only refusals"
    )
    world.assert_ledgers_verify()


def _openapi() -> dict[str, Any]:
    """The app's OpenAPI document (building the app opens no database)."""
    never_opened = Path(__file__).parent / "never-opened.db"
    return create_app(Settings(database_url=f"sqlite:///{never_opened}")).openapi()


# Loaded at import, one item per operation. (Schemathesis' fixture-loaded schemas,
# `schemathesis.pytest.from_fixture`, do not run on this pytest: they rename `Function._nodeid`.)
schema = schemathesis.openapi.from_dict(_openapi())


def _operation_id(context: schemathesis.HookContext) -> str | None:
    operation = context.operation
    return None if operation is None else operation.definition.raw.get("operationId")


@schema.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: dict[str, Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """Half the time, aim at the objects the world made instead of random ids."""
    if not path_parameters:
        return st.just(path_parameters)
    aimed = {name: TARGETS.get(name, value) for name, value in path_parameters.items()}
    aimed.update(OWN_TARGETS.get(_operation_id(context) or "", {}))
    return st.sampled_from([aimed, path_parameters])


@schema.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Half the time, a valid plan or release (random ones rarely pass the cross-field rules)."""
    valid = VALID_BODIES.get(_operation_id(context) or "")
    return st.sampled_from([*valid, body]) if valid else st.just(body)


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_openapi_conformance(
    case: schemathesis.Case[Any], world: World, answers: list[int]
) -> None:
    """No 5xx; a declared status, media type and body schema for every answer."""
    response = case.call_and_validate(
        app=world.app,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        checks=CHECKS,
    )
    answers.append(response.status_code)
