"""Schemathesis against the service's own OpenAPI document, in process, on every backend.

Every operation gets generated requests, valid and invalid (Schemathesis' coverage cases, then a
bounded, derandomized fuzzing run), then the stateful phase follows the document's links
(dataset → runs → epochs → complete, release → void, key → revoke). Each runs twice per backend:
with the bootstrap admin key and with a trainer key scoped to the fuzzed dataset. Every
answer goes through every Schemathesis check (`--checks all`); the one narrowed check is
`positive_data_acceptance`, and only for the refusals listed in EXCLUSIONS (each matched by
operation, code and a phrase of the detail), each with the reason
no schema a generator can type says it (docs/api.md lists them too).

A dataset with active runs, a charge and a spare key exist up front, and the fuzzing aims its
path parameters at them half of the time (and sends a valid plan or release half of the time,
which random bodies rarely are), so 2xx answers are checked too, not only refusals. Afterwards
each operation must have had at least one 2xx answer (else the run tested only refusals, e.g.
if authentication silently failed), and every dataset's ledger must still verify.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.generation.stateful import run_state_machine_as_test
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from starlette.types import ASGIApp

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ADMIN_KEY, Api
from tests.service.test_roles import served_app
from tests.trainer_client.conftest import free_port

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
# Schema-valid requests the service refuses with 422 for a reason the schema does not carry:
# (operation ids, problem code, the start of the detail, why no schema a generator types says it).
EXCLUSIONS: list[tuple[frozenset[str], str, str, str]] = [
    (
        frozenset(
            {
                "create_dataset",
                "update_dataset",
                "void_charge",
                "create_key",
                "create_run",
                "create_release",
                "reserve_epoch",
                "complete_run",
                "abort_run",
            }
        ),
        "idempotency_conflict",
        "this Idempotency-Key was already used",
        "state, not shape: the same key was sent before with another request",
    ),
    (
        frozenset({"plan_epsilon", "create_run"}),
        "validation_error",
        "noise_multiplier is too small",
        "the smallest σ with a finite ε depends on sample rate, steps and δ together",
    ),
    (
        frozenset({"plan_noise_multiplier", "create_run"}),
        "validation_error",
        "target_epsilon=",
        "whether σ ≤ 1e6 reaches a target ε depends on sample rate, steps and δ together",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "body: Value error, a Laplace release's ε (sensitivity / noise_scale)",
        "a bound on the quotient of two fields",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "scale must be finite",
        "the noise scale sensitivity / ε overflows: a bound on the quotient of two fields",
    ),
    (
        frozenset({"create_run"}),
        "validation_error",
        "body: Value error, give exactly one of target_epsilon, noise_multiplier and fit_remaining",
        "exactly one of three fields: a oneOf, which generators type as a union of partial bodies",
    ),
    (
        frozenset({"create_run"}),
        "validation_error",
        "body: Value error, steps_per_epoch × epochs must be at most",
        "a bound on the product of two fields",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "give exactly one of epsilon and noise_scale",
        "exactly one of two fields: a oneOf, which generators type as a union of partial bodies",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "a Gaussian release with epsilon needs delta",
        "a field required by the values of two others",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "delta does not apply to a",
        "a field forbidden by another's value (a per-mechanism body: a oneOf, as above)",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "a pure_dp release takes epsilon only",
        "fields forbidden by another's value (a per-mechanism body: a oneOf, as above)",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "values[",
        "the largest value the noise grid carries exactly depends on the noise scale",
    ),
    (
        frozenset({"create_key"}),
        "validation_error",
        "datasets: no dataset",
        "state, not shape: a key's scope must name datasets that exist",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "the request's noise scale or ε is out of range",
        "a bound on the quotient of two fields (the noise scale Δ/ε overflows)",
    ),
    (
        frozenset({"create_key"}),
        "validation_error",
        "body: Value error, admin keys cannot be scoped",
        "a field forbidden by another's value (role admin: no datasets)",
    ),
    # Dataset creation: the default shares need a positive cap (one field's value constrains
    # another's), and explicit shares relate items of two arrays (as many weights as orders,
    # distinct orders, weights summing to at most 1): JSON Schema relates no array items.
    (
        frozenset({"create_dataset"}),
        "validation_error",
        "shares need a cap above 0",
        "a field's value (the profile) constrains another's (the cap)",
    ),
    (
        frozenset({"create_dataset"}),
        "validation_error",
        "shares: ",
        "relations between the items of two arrays (orders and weights)",
    ),
    # Releases: noisy_argmax and batches are per-mechanism bodies (a oneOf, as above) with
    # relations between array items no schema states.
    (
        frozenset({"create_release"}),
        "validation_error",
        ": only for a noisy_argmax query",
        "fields forbidden by another's value (a per-mechanism body: a oneOf, as above)",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        ": not for a noisy_argmax query",
        "fields forbidden by another's value (a per-mechanism body: a oneOf, as above)",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "a noisy_argmax query needs teachers and votes",
        "fields required by another's value (a per-mechanism body: a oneOf, as above)",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "a noisy_argmax query with epsilon needs delta",
        "a field required by the values of two others",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "a noisy_argmax noise_scale must be from",
        "a bound that depends on another field's value (the mechanism)",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "the noise on each count must have σ from",
        "σ is calibrated from ε and δ together",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "this noise_scale is too small for a finite ε per query",
        "whether σ gives a finite ε depends on σ and δ together",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "every histogram of votes must have the same number of classes",
        "equal lengths of the inner arrays: JSON Schema relates no array items",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "teachers (each teacher votes at most once per query)",
        "a histogram's sum bounded by another field (teachers)",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "counts in all",
        "a bound on the product of two array lengths",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "values in all",
        "a bound on the product of two array lengths",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "give values (one release) or batch (several), not both",
        "two fields that exclude each other (a oneOf)",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "the vectors of a batch must all hold the same number",
        "equal lengths of the inner arrays: JSON Schema relates no array items",
    ),
    (
        frozenset({"create_release"}),
        "validation_error",
        "count is for releases whose noise you add",
        "a field forbidden by another's value",
    ),
]


def positive_data_acceptance_but_exclusions(ctx: Any, response: Any, case: Any) -> bool | None:
    """`positive_data_acceptance`, except for the refusals EXCLUSIONS lists (and only those)."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        operation_id = case.operation.definition.raw.get("operationId")
        try:
            problem = response.json()
        except ValueError:
            raise
        for operations, code, detail, _reason in EXCLUSIONS:
            if (
                operation_id in operations
                and response.status_code == 422
                and problem.get("code") == code
                and detail in str(problem.get("detail", ""))
            ):
                return None
        raise


load_all_checks()
ALL_CHECKS = [check for check in CHECKS.get_all() if check is not positive_data_acceptance]
ALL_CHECKS.append(positive_data_acceptance_but_exclusions)
# What a trainer key may succeed at (everything else must refuse it).
TRAINER_OPERATIONS = {
    "list_datasets",
    "get_dataset",
    "create_run",
    "list_runs",
    "get_run",
    "reserve_epoch",
    "complete_run",
    "abort_run",
    "create_release",
    "plan_epsilon",
    "plan_noise_multiplier",
    "livez",
    "livez_head",
    "readyz",
    "metrics",
}
# Where the fuzzing aims, by path parameter, in the current backend's app (filled by `world`;
# the generation hooks below read them while the tests run). Operations that change their target
# for good get their own, so the others keep theirs: PATCH may freeze its dataset or zero its
# cap, complete and abort each end a run.
TARGETS: dict[str, Any] = {}
OWN_TARGETS: dict[str, dict[str, Any]] = {}


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """`app` served by uvicorn on a loopback port in a thread; its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30.0
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)  # the poll interval, not a wait for something to happen
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30.0)


@dataclass
class World:
    """One backend's app, the key the fuzzing sends, and the bootstrap admin for looking behind
    the fuzzing's back."""

    base_url: str
    admin: Api
    role: str
    key: str
    backend: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def assert_ledgers_verify(self) -> None:
        listed = self.admin.get("/v1/datasets", params={"limit": 1000})
        assert listed.status_code == 200, listed.text
        for dataset in listed.json()["data"]:
            verified = self.admin.get(f"/v1/datasets/{dataset['id']}/ledger/verify")
            assert verified.status_code == 200, verified.text
            assert verified.json()["ok"] is True, (dataset["id"], verified.json())


@pytest.fixture(
    scope="module",
    params=[
        ("sqlite", "admin"),
        ("sqlite", "trainer"),
        ("postgresql", "admin"),
        ("postgresql", "trainer"),
    ],
    ids=lambda p: "-".join(p),
)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One app per backend and key for the whole module, with the objects the fuzzing aims at."""
    backend, role = request.param
    with _world(backend, role, tmp_path_factory.mktemp("schemathesis")) as built:
        yield built


@contextmanager
def _world(backend: str, role: str, directory: Path) -> Iterator[World]:
    """An app with the objects the fuzzing aims at; the targets it replaces are put back after."""
    saved, own_saved = dict(TARGETS), dict(OWN_TARGETS)
    with served_app(backend, directory) as client:
        admin = Api(client, ADMIN_KEY)
        admin.create_dataset(DATASET, 1000.0)
        admin.create_dataset(PATCHED, 10.0)
        key = ADMIN_KEY if role == "admin" else admin.new_key("trainer", [DATASET])
        fuzzer = admin.as_key(key)
        planned = [fuzzer.post(f"/v1/datasets/{DATASET}/runs", PLAN) for _ in range(3)]
        assert all(run.status_code == 201 for run in planned), [run.text for run in planned]
        run_id, to_complete, to_abort = (run.json()["id"] for run in planned)
        charge = fuzzer.post(f"/v1/datasets/{DATASET}/releases", RELEASE)
        assert charge.status_code == 201, charge.text
        spare = admin.post("/v1/keys", {"role": "trainer", "name": "to revoke"})
        assert spare.status_code == 201, spare.text
        TARGETS.update(
            dataset_id=DATASET,
            run_id=run_id,
            seq=charge.json()["ledger_seq"],
            key_id=spare.json()["id"],
        )
        OWN_TARGETS.update(
            update_dataset={"dataset_id": PATCHED},
            complete_run={"run_id": to_complete},
            abort_run={"run_id": to_abort},
        )
        try:
            # Over loopback, as a client would: the checks that re-send a request (without its
            # key, after a delete, …) send it the way the case was sent.
            with serving(client.app) as base_url:
                yield World(base_url, admin, role, key, backend)
        finally:
            TARGETS.clear()
            OWN_TARGETS.clear()
            TARGETS.update(saved)
            OWN_TARGETS.update(own_saved)


@dataclass
class Answers:
    """The statuses one operation's requests got."""

    operation_id: str | None = None
    statuses: list[int] = field(default_factory=list)


@pytest.fixture
def answers(world: World) -> Iterator[Answers]:
    """One operation's answers; checked when its examples are done: some succeeded if the key
    may do it (else the run tested only refusals, e.g. if authentication silently failed),
    none did if it may not."""
    got = Answers()
    yield got
    succeeded = sorted({status for status in got.statuses if 200 <= status < 300})
    if world.role == "admin" or got.operation_id in TRAINER_OPERATIONS:
        assert succeeded, f"no request succeeded, only {sorted(set(got.statuses))}"
    else:
        assert not succeeded, f"a {world.role} key succeeded at {got.operation_id}: {succeeded}"
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


def _checks_for(case: schemathesis.Case[Any]) -> list[Any]:
    """Every check, but `negative_data_rejection` where a case is not invalid after all:
    flatmap_body swaps valid bodies also into cases generated to be invalid."""
    raw = case.operation.definition.raw
    if case.body in VALID_BODIES.get(raw.get("operationId") or "", []):
        return [check for check in ALL_CHECKS if check is not negative_data_rejection]
    # OpenAPI cannot close the set of query parameters (there is no additionalProperties for
    # them), and the service ignores the ones it does not declare, as HTTP APIs do: a request
    # made invalid only by an undeclared one is not invalid by any schema.
    declared = {p["name"] for p in raw.get("parameters", []) if p.get("in") == "query"}
    if set(case.query or {}) - declared:
        return [check for check in ALL_CHECKS if check is not negative_data_rejection]
    return ALL_CHECKS


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_openapi_conformance(case: schemathesis.Case[Any], world: World, answers: Answers) -> None:
    """Every check passes (but EXCLUSIONS) for every answer, with the admin and a trainer key."""
    answers.operation_id = case.operation.definition.raw.get("operationId")
    response = case.call_and_validate(
        base_url=world.base_url, headers=world.headers, checks=_checks_for(case)
    )
    answers.statuses.append(response.status_code)


def test_stateful_phase_follows_the_links(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Sequences along the document's links; every check on every step, for each key.

    On an app of its own, set up as the fuzzing's: the rules a step may take depend on what the
    server answered before, so on a server the fuzzing phase had left in whatever state, a
    derandomized run could replay a prefix into another state (FlakyStrategyDefinition).
    """
    load_all_checks()
    with _world(world.backend, world.role, tmp_path_factory.mktemp("stateful")) as fresh:
        _stateful(fresh)


def _stateful(world: World) -> None:
    class Ledger(schema.as_state_machine()):  # type: ignore[misc]
        def call(self, case: schemathesis.Case[Any], **kwargs: Any) -> Any:
            return case.call(base_url=world.base_url, headers=world.headers)

        def validate_response(
            self, response: Any, case: schemathesis.Case[Any], *args: Any, **kwargs: Any
        ) -> None:
            case.validate_response(
                response,
                checks=_checks_for(case),
                headers=world.headers,
                transport_kwargs={"base_url": world.base_url},
                recorder=getattr(self, "recorder", None),
            )

    run_state_machine_as_test(
        Ledger,
        settings=settings(
            max_examples=15,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    world.assert_ledgers_verify()
