"""The client's models against the real service: every answer it can give parses.

The client's models (`trainer_client.models`) and the service's response schemas
(`service/api/schemas.py`) are written twice, by hand; these tests hold them together.
"""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import inspect
import time
import typing
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from service.settings import Settings
from service.storage.models import ENTRY_KINDS
from tests.trainer_client import openapi_walk, wire
from tests.trainer_client.conftest import LedgerServer, NewDataset
from trainer_client import (
    ApiKey,
    AsyncLedgerClient,
    BadRequest,
    BudgetExhausted,
    Conflict,
    Dataset,
    DatasetFrozen,
    DecidedBy,
    Effect,
    Epoch,
    EpsilonEstimate,
    Forbidden,
    IdempotencyConflict,
    LedgerClient,
    LedgerEntry,
    LedgerError,
    NoiseCalibration,
    NotFound,
    OutsideGuarantee,
    Release,
    RunNotActive,
    RunRecord,
    Shares,
    Unauthorized,
    ValidationError,
    VerifyResult,
    _http,
    errors,
)
from trainer_client.errors import error_from_problem


def test_a_pure_dp_release_parses_and_its_replay_too(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    """The service adds no noise to a generic pure ε-DP release: `noise_scale` is null."""
    dataset_id = new_dataset(epsilon_cap=1.0)
    key = str(uuid.uuid4())
    with ledger_server.client() as client:
        release = client.release(
            dataset_id, mechanism="pure_dp", sensitivity=1.0, epsilon=0.1, idempotency_key=key
        )
        assert release.noise_scale is None and release.epsilon == 0.1
        assert release.dataset.epsilon_spent > 0.0
        replayed = client.release(
            dataset_id, mechanism="pure_dp", sensitivity=1.0, epsilon=0.1, idempotency_key=key
        )
        assert replayed.id == release.id and replayed.ledger_seq == release.ledger_seq
        assert client.dataset(dataset_id).epsilon_spent == release.dataset.epsilon_spent


def test_a_pure_dp_release_parses_in_the_async_client(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    dataset_id = new_dataset(epsilon_cap=1.0)

    async def release_twice() -> None:
        async with AsyncLedgerClient(ledger_server.url, ledger_server.admin_key) as client:
            preview = await client.release(
                dataset_id, mechanism="pure_dp", epsilon=0.1, dry_run=True
            )
            assert preview.dry_run and preview.id is None and preview.noise_scale is None
            release = await client.release(dataset_id, mechanism="pure_dp", epsilon=0.1)
            assert release.id is not None and release.noise_scale is None
            # The preview showed the budget as the charge leaves it, and charged nothing itself.
            assert release.dataset.epsilon_spent == preview.dataset.epsilon_spent > 0.0
            assert (await client.dataset(dataset_id)).ledger_seq == release.ledger_seq

    asyncio.run(release_twice())


# The contract: every route and state, through both clients, checked against /openapi.json ---

# Each client model and the response schemas it reads (every 2xx schema must have one).
MODELS: dict[type[Any], tuple[str, ...]] = {
    Dataset: ("DatasetPublic",),
    RunRecord: ("RunPublic", "RunWithDataset", "RunDryRun"),
    Epoch: ("EpochPublic", "EpochDryRun"),
    Release: ("ReleasePublic", "ReleaseDryRun"),
    LedgerEntry: ("EntryPublic",),
    VerifyResult: ("VerifyPublic",),
    Shares: ("SharesPublic",),
    DecidedBy: ("DecidedByPublic",),
    OutsideGuarantee: ("OutsideGuaranteePublic",),
    Effect: ("EffectPublic",),
    ApiKey: ("KeyPublic", "KeyCreated"),
    EpsilonEstimate: ("EpsilonPublic",),
    NoiseCalibration: ("NoiseMultiplierPublic",),
}
BY_SCHEMA = {name: model for model, names in MODELS.items() for name in names}
# Client fields named apart from the wire's (model field → JSON field).
WIRE_NAMES: dict[type[Any], dict[str, str]] = {Epoch: {"index": "epoch"}}
# Read by the client as an error (the exception the real call would raise), not as a model.
REFUSED_DRY_RUN = "DryRunRefused"
# Every problem code the scenario provokes (503 and 500 need a broken database or a bug).
PROVOKED_CODES = {
    "budget_exhausted",
    "unauthorized",
    "forbidden",
    "not_found",
    "validation_error",
    "idempotency_conflict",
    "conflict",
    "run_not_active",
    "dataset_frozen",
    "malformed_request",
    "payload_too_large",
    "unsupported_media_type",
}
EXPIRY_DEADLINE_S = 20.0


def wire_fields(model: type[Any]) -> dict[str, str]:
    """A model's fields read from the wire: model field name → JSON field name."""
    names = WIRE_NAMES.get(model, {})
    return {f.name: names.get(f.name, f.name) for f in dataclasses.fields(model) if f.name != "raw"}


def admits_none(model: type[Any], name: str) -> bool:
    """Whether the model's field is typed to hold None."""
    hint = typing.get_type_hints(model)[name]
    return hint is type(None) or type(None) in typing.get_args(hint)


def has_default(model: type[Any], name: str) -> bool:
    """Whether the model's field has a default (what it holds when the answer leaves it out)."""
    return any(
        f.name == name and f.default is not dataclasses.MISSING for f in dataclasses.fields(model)
    )


def optional(model: type[Any], name: str) -> bool:
    """Whether the model reads an answer without this field."""
    return admits_none(model, name) or has_default(model, name)


@pytest.fixture(scope="module")
def spec(ledger_server: LedgerServer) -> dict[str, Any]:
    """The service's OpenAPI document, as it serves it."""
    answer = httpx.get(ledger_server.url + "/openapi.json", trust_env=False)
    assert answer.status_code == 200
    return dict(answer.json())


def test_every_client_field_is_optional_exactly_where_the_schema_lets_it_be(
    spec: dict[str, Any],
) -> None:
    problems = []
    for model, names in MODELS.items():
        schemas = [openapi_walk.component(spec, name) for name in names]
        for attr, json_name in wire_fields(model).items():
            where = f"{model.__name__}.{attr}"
            carrying = [s for s in schemas if json_name in s.get("properties", {})]
            if not carrying:
                problems.append(f"{where}: no schema of {names} has {json_name!r} (a dead field)")
                continue
            null = any(openapi_walk.nullable(s["properties"][json_name], spec) for s in carrying)
            absent = len(carrying) < len(schemas) or any(
                json_name not in s.get("required", ()) for s in carrying
            )
            if null and not admits_none(model, attr):
                problems.append(f"{where}: the service may send null, the model does not admit it")
            if absent and not optional(model, attr):
                problems.append(f"{where}: the service may leave it out, the model needs it")
            if not (null or absent) and admits_none(model, attr):
                problems.append(f"{where}: admits None, but the service always sends a value")
            for s in carrying:
                nested = openapi_walk.ref_name(s["properties"][json_name])
                hint = typing.get_type_hints(model)[attr]
                nested_models = {m for m in (hint, *typing.get_args(hint)) if m in MODELS}
                if nested is not None and {BY_SCHEMA.get(nested)} != nested_models:
                    problems.append(f"{where}: schema {nested} is read by {nested_models}")
    assert problems == []


def test_every_answer_the_service_documents_has_a_client_model(spec: dict[str, Any]) -> None:
    unmodelled = set()
    for template, operations in spec["paths"].items():
        if not template.startswith("/v1/"):
            continue  # health and metrics: for probes and Prometheus, not for the client
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                if not status.startswith("2") or not schema:
                    continue
                for alternative in schema.get("anyOf", [schema]):
                    name = openapi_walk.ref_name(alternative)
                    assert name is not None, (template, status, schema)
                    data = openapi_walk.component(spec, name)["properties"].get("data")
                    if data is not None:  # a page: its items are the answer
                        name = openapi_walk.ref_name(data["items"])
                    if name not in BY_SCHEMA and name != REFUSED_DRY_RUN:
                        unmodelled.add(name)
    assert unmodelled == set()


Call = Callable[..., Awaitable[Any]]


async def call(target: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """`target.method(...)` for a sync or async client alike; a listing comes back as a list."""
    result = getattr(target, method)(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    if isinstance(result, collections.abc.AsyncGenerator):
        return [item async for item in result]
    if isinstance(result, collections.abc.Generator):
        return list(result)
    return result


async def every_route_and_state(admin: Any, connect: Callable[[str], Any]) -> None:
    """Drive every /v1 route, resource state and refusal through one client (`connect(key)`
    gives another client of the same kind); assert what a user would see."""
    ds = "contract-" + uuid.uuid4().hex[:10]
    created = await call(admin, "create_dataset", ds, epsilon_cap=3.0, delta=1e-5)
    assert created.epsilon_spent == 0.0 and created.ledger_seq == 1
    # The default profile: no weights until the first admission fixes them.
    assert created.shares.profile == "first_admission" and created.shares.weights == ()
    assert created.shares.fixed_at_seq is None
    fixed = await call(
        admin,
        "create_dataset",
        ds + "-fixed",
        epsilon_cap=3.0,
        delta=1e-5,
        shares={"profile": "default"},
    )
    assert fixed.shares.profile == "default" and fixed.shares.weights
    assert fixed.shares.fixed_at_seq is None
    with pytest.raises(Conflict):
        await call(admin, "create_dataset", ds, epsilon_cap=3.0, delta=1e-5)
    assert ds in [d.id for d in await call(admin, "datasets")]
    with pytest.raises(NotFound):
        await call(admin, "dataset", "no-such-dataset")
    with pytest.raises(NotFound):
        await call(admin, "run", "run_no_such_run")

    estimate = await call(
        admin, "epsilon", sample_rate=0.01, noise_multiplier=1.0, steps=100, delta=1e-5
    )
    calibration = await call(
        admin, "noise_multiplier", sample_rate=0.01, steps=100, target_epsilon=1.0, delta=1e-5
    )
    assert estimate.epsilon > 0 and calibration.epsilon <= 1.0

    plan = {"sample_rate": 0.01, "steps_per_epoch": 10, "epochs": 2}
    preview = await call(admin, "preview_run", ds, **plan, target_epsilon=0.5, max_grad_norm=1.0)
    assert preview.dry_run and preview.id is None and preview.dataset is not None
    with pytest.raises(BudgetExhausted):
        await call(admin, "preview_run", ds, **plan, noise_multiplier=0.05)

    completed = await call(admin, "start_run", ds, **plan, target_epsilon=0.5, name="done")
    await call(completed, "reserve_epoch")
    would_be = await call(completed, "preview_epoch")
    assert would_be.dry_run and would_be.ledger_seq is None and would_be.index == 2
    await call(completed, "reserve_epoch")
    beyond = await call(completed, "reserve_epoch")
    assert beyond.beyond_plan and beyond.index == 3
    assert (await call(completed, "complete")).status == "completed"
    with pytest.raises(RunNotActive):
        await call(completed, "reserve_epoch")

    aborted = await call(admin, "start_run", ds, **plan, noise_multiplier=5.0, sampling="shuffle")
    assert aborted.max_grad_norm is None and aborted.record.target_epsilon is None
    assert (await call(aborted, "abort")).status == "aborted"

    lapsing = await call(admin, "start_run", ds, **plan, noise_multiplier=5.0, lease_seconds=1)
    deadline = time.monotonic() + EXPIRY_DEADLINE_S
    while (await call(lapsing, "refresh")).status != "expired":
        assert time.monotonic() < deadline, "a 1 s lease did not expire within the deadline"
        await asyncio.sleep(0.05)  # the poll interval
    statuses = {r.status for r in await call(admin, "runs", ds)}
    assert statuses == {"completed", "aborted", "expired"}
    assert [r.id for r in await call(admin, "runs", ds, status="expired")] == [lapsing.id]

    key = str(uuid.uuid4())
    kinds: list[dict[str, Any]] = [
        {"mechanism": "gaussian", "epsilon": 0.1, "delta": 1e-6},
        {"mechanism": "gaussian", "noise_scale": 20.0},
        {"mechanism": "laplace", "epsilon": 0.1},
        {"mechanism": "laplace", "noise_scale": 20.0},
        {"mechanism": "pure_dp", "epsilon": 0.05},
    ]
    for release in kinds:
        dry = await call(admin, "release", ds, **release, dry_run=True)
        assert dry.dry_run and dry.id is None and dry.ledger_seq is None
        charged = await call(admin, "release", ds, **release, name="r")
        assert charged.id is not None and (charged.noise_scale is None) == (
            release["mechanism"] == "pure_dp"
        )
    first = await call(admin, "release", ds, mechanism="laplace", epsilon=0.01, idempotency_key=key)
    again = await call(admin, "release", ds, mechanism="laplace", epsilon=0.01, idempotency_key=key)
    assert again.ledger_seq == first.ledger_seq
    with pytest.raises(IdempotencyConflict):
        await call(admin, "release", ds, mechanism="laplace", epsilon=0.02, idempotency_key=key)
    for mechanism, delta in (("gaussian", 1e-6), ("laplace", None)):
        noised = await call(
            admin, "noisy", ds, [1.0, 2.0], mechanism=mechanism, sensitivity=1.0, epsilon=0.1,
            delta=delta,
        )  # fmt: skip
        assert len(noised) == 2
    with pytest.raises(ValidationError):
        await call(admin, "noisy", ds, [1.0], mechanism="pure_dp", sensitivity=1.0, epsilon=0.1)
    # Private prediction: K vote histograms in, K labels out (one entry); batches of releases.
    labels = await call(admin, "private_argmax", ds, [[3, 1], [0, 4]], teachers=4, noise_scale=50.0)
    assert len(labels) == 2 and set(labels) <= {0, 1}
    with pytest.raises(ValidationError):
        await call(admin, "private_argmax", ds, [[3, 2]], teachers=4, noise_scale=50.0)
    vectors = await call(
        admin, "noisy_batch", ds, [[1.0], [2.0]], mechanism="laplace", sensitivity=1.0,
        epsilon=0.1,
    )  # fmt: skip
    assert [len(vector) for vector in vectors] == [1, 1]
    counted = await call(admin, "release", ds, mechanism="pure_dp", epsilon=0.01, count=3)
    assert counted.count == 3 and counted.labels is None and counted.noised_batch is None
    with pytest.raises(ValidationError):
        await call(admin, "release", ds, mechanism="laplace", epsilon=-1.0)
    with pytest.raises(BudgetExhausted):
        await call(admin, "release", ds, mechanism="laplace", epsilon=100.0, dry_run=True)
    with pytest.raises(BudgetExhausted):
        await call(admin, "release", ds, mechanism="laplace", epsilon=100.0)

    voided = await call(admin, "void_entry", ds, first.ledger_seq, reason="contract test")
    assert voided.kind == "void" and voided.voids_seq == first.ledger_seq
    with pytest.raises(Conflict):
        await call(admin, "void_entry", ds, first.ledger_seq, reason="twice")
    await call(admin, "update_dataset", ds, epsilon_cap=4.0, reason="more")
    await call(admin, "update_dataset", ds, description="changed")
    assert (await call(admin, "update_dataset", ds, frozen=True)).frozen
    with pytest.raises(DatasetFrozen):
        await call(admin, "release", ds, mechanism="laplace", epsilon=0.01)
    await call(admin, "update_dataset", ds, frozen=False)

    issued = await call(admin, "create_key", "trainer", datasets=[ds], name="contract")
    assert issued.key and issued.id in [k.id for k in await call(admin, "keys")]
    watcher = await call(admin, "create_key", "auditor", datasets=[ds], name="contract auditor")
    assert watcher.key is not None
    # An auditor reads the metadata (never the secret) of the keys that may act on its datasets.
    seen = {k.id: k for k in await call(connect(watcher.key), "keys")}
    assert seen[issued.id].name == "contract" and seen[issued.id].key is None
    trainer = connect(issued.key)
    assert (await call(trainer, "dataset", ds)).id == ds
    with pytest.raises(Forbidden):
        await call(trainer, "create_dataset", ds + "-x", epsilon_cap=1.0, delta=1e-5)
    assert (await call(admin, "revoke_key", issued.id)).revoked_at is not None
    with pytest.raises(Unauthorized):
        await call(trainer, "dataset", ds)

    entries = await call(admin, "ledger", ds, page_size=7)
    # `correction` and `hold_top_up` are written only when a dataset migrated with old shuffle
    # charges is corrected (tests/service/test_shuffle_correction.py); no API call makes them.
    assert {e.kind for e in entries} == set(ENTRY_KINDS) - {"correction", "hold_top_up"}
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    # Every entry here was written by the bootstrap key or (a lapsed lease) the service itself.
    assert {(e.actor, e.actor_name, e.actor_role) for e in entries} == {
        ("bootstrap", "LEDGER_ADMIN_KEY", "admin"),
        ("system", "ledger service", "system"),
    }
    assert (await call(admin, "ledger_csv", ds)).startswith("seq,")
    assert (await call(admin, "verify", ds)).ok


def raw_refusals(url: str, key: str, recording: wire.Recording) -> None:
    """Bodies no client method can send (not JSON, too large, not JSON at all), through the
    client's own answer handling."""
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": str(uuid.uuid4())}
    transport = wire.RecordingTransport(recording)
    path = "/v1/accountant/epsilon"
    too_large = Settings.model_fields["max_body_bytes"].default  # the live server's limit
    sent = [
        (b"{not json", "application/json", BadRequest),
        (b" " * (too_large + 1), "application/json", BadRequest),
        (b"sample_rate=0.1", "text/plain", BadRequest),
    ]
    with httpx.Client(base_url=url, transport=transport, headers=headers) as http:
        for content, media_type, expected in sent:
            answer = http.post(path, content=content, headers={"Content-Type": media_type})
            with pytest.raises(expected):
                _http.raise_for_status(answer, 1)


def check_recording(spec: dict[str, Any], recording: wire.Recording) -> None:
    """Every answer documented and conforming; every /v1 route answered 2xx; every model reads
    its answers with each nullable field null and refuses each required field null or gone."""
    problems: list[str] = []
    answered: set[tuple[str, str]] = set()
    codes: set[str] = set()
    for exchange in recording.exchanges:
        found = openapi_walk.operation(spec, exchange.method, exchange.path)
        assert found is not None, f"{exchange}: no such operation in /openapi.json"
        template, op = found
        schema = openapi_walk.response_schema(op, exchange.status, exchange.media_type)
        if schema is None:
            problems.append(f"{exchange}: status or media type not documented")
            continue
        if 200 <= exchange.status < 300:
            answered.add((exchange.method, template))
        if not exchange.media_type.endswith("json"):
            continue
        # RFC 9457 lets a problem carry extension members (a refusal's figures, field errors).
        is_problem = exchange.media_type == "application/problem+json"
        problems += [
            f"{exchange}: {p}"
            for p in openapi_walk.violations(exchange.body, schema, spec, extensions=is_problem)
        ]
        body = exchange.body
        if is_problem:
            codes.add(body["code"])
            assert error_from_problem(exchange.status, body).code == body["code"]
            continue
        name = openapi_walk.documented_component(body, schema, spec)
        if name == REFUSED_DRY_RUN:
            codes.add(body["refusal"]["code"])
            continue
        assert name is not None, f"{exchange}: matches no documented schema"
        items = [body]
        if "data" in body and "has_more" in body:  # a page: its items are the answer
            data = openapi_walk.component(spec, name)["properties"]["data"]
            items, name = body["data"], openapi_walk.ref_name(data["items"])
        for item in items:
            problems += mutated_bodies_read_as_documented(spec, str(name), item)
    assert not problems, "\n".join(sorted(set(problems)))
    routes = {
        (method.upper(), template)
        for template, operations in spec["paths"].items()
        if template.startswith("/v1/")
        for method in operations
    }
    assert routes - answered == set()
    assert codes == PROVOKED_CODES
    assert codes <= set(errors._BY_CODE)  # each maps to its own exception class


def mutated_bodies_read_as_documented(spec: dict[str, Any], name: str, body: Any) -> list[str]:
    """The model of schema `name` reads `body` with any nullable field null or any optional
    one left out, and refuses it with any field it reads that is never null sent null or left
    out (no silent default)."""
    model = BY_SCHEMA[name]
    schema = openapi_walk.component(spec, name)
    # What the model must refuse: the fields it types without None (never null or absent in
    # any schema it reads; the static test above holds the types to that).
    read = {j for attr, j in wire_fields(model).items() if not optional(model, attr)}
    problems = []
    model.from_json(body)
    for field, declared in schema["properties"].items():
        changes: list[tuple[str, dict[str, Any], bool]] = []
        without = {k: v for k, v in body.items() if k != field}
        if openapi_walk.nullable(declared, spec):
            changes.append(("null", {**body, field: None}, True))
        elif field in read:
            changes.append(("null", {**body, field: None}, False))
            if field in schema.get("required", ()):
                changes.append(("left out", without, False))
        if field not in schema.get("required", ()):
            changes.append(("left out", without, True))
        for how, changed, fine in changes:
            try:
                model.from_json(changed)
                accepted = True
            except LedgerError:
                accepted = False
            if accepted != fine:
                verb = "refuses" if fine else "accepts"
                problems.append(f"{model.__name__} {verb} {name}.{field} {how}")
    return problems


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_every_answer_parses_with_the_clients_models_and_matches_openapi(
    flavour: str, ledger_server: LedgerServer, spec: dict[str, Any]
) -> None:
    recording = wire.Recording()

    async def drive() -> None:
        if flavour == "sync":

            def connect(key: str) -> Any:
                transport = wire.RecordingTransport(recording)
                return LedgerClient(ledger_server.url, key, transport=transport)

            with connect(ledger_server.admin_key) as admin:
                await every_route_and_state(admin, connect)
        else:

            def connect(key: str) -> Any:
                transport = wire.AsyncRecordingTransport(recording)
                return AsyncLedgerClient(ledger_server.url, key, transport=transport)

            async with connect(ledger_server.admin_key) as admin:
                await every_route_and_state(admin, connect)

    asyncio.run(drive())
    with pytest.raises(Unauthorized):
        LedgerClient(
            ledger_server.url, "pl_not_a_key", transport=wire.RecordingTransport(recording)
        ).dataset("x")
    raw_refusals(ledger_server.url, ledger_server.admin_key, recording)
    check_recording(spec, recording)
