"""The client's HTTP behaviour through httpx.MockTransport: idempotency keys, retries,
error mapping, pagination, dry runs."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import httpx
import pytest

from tests.trainer_client.fake_ledger import (
    DATASET,
    FakeLedger,
    dataset_body,
    effect_body,
    entry_body,
    problem,
)
from trainer_client import (
    AsyncLedgerClient,
    AuthError,
    BadRequest,
    BudgetExhausted,
    Conflict,
    DatasetFrozen,
    Forbidden,
    IdempotencyConflict,
    LedgerClient,
    LedgerError,
    NotFound,
    RunNotActive,
    ServerError,
    TransportError,
    Unauthorized,
    ValidationError,
)
from trainer_client._http import RetryPolicy

URL = "http://ledger.test"
KEY = "pl_test_secret"

Step = httpx.Response | Exception


class Script:
    """A MockTransport handler answering from a list: a Response, or an exception to raise."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        return step

    def keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.requests]


def client_for(script: Script, **kwargs: Any) -> LedgerClient:
    return LedgerClient(URL, KEY, transport=httpx.MockTransport(script), **kwargs)


def async_client_for(script: Script, **kwargs: Any) -> AsyncLedgerClient:
    return AsyncLedgerClient(URL, KEY, transport=httpx.MockTransport(script), **kwargs)


def created_dataset() -> httpx.Response:
    return httpx.Response(201, json=dataset_body())


def create(client: LedgerClient, **kwargs: Any) -> Any:
    return client.create_dataset(DATASET, epsilon_cap=8.0, delta=1e-5, **kwargs)


# Idempotency keys ---------------------------------------------------------------------------


def test_every_post_carries_a_fresh_uuid_idempotency_key_and_gets_none() -> None:
    script = Script(created_dataset())
    with client_for(script) as client:
        create(client)
        create(client)
        client.dataset(DATASET)
    post_keys = script.keys()[:2]
    assert all(k is not None for k in post_keys)
    assert post_keys[0] != post_keys[1]
    assert all(uuid.UUID(str(k)).version == 4 for k in post_keys)
    assert script.keys()[2] is None  # a GET is naturally idempotent: no key
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in script.requests)


def test_caller_supplied_idempotency_key_is_sent_as_is() -> None:
    script = Script(created_dataset())
    with client_for(script) as client:
        create(client, idempotency_key="my-key-1")
    assert script.keys() == ["my-key-1"]


def test_post_body_is_json_with_only_the_given_fields() -> None:
    script = Script(created_dataset())
    with client_for(script) as client:
        create(client)
    request = script.requests[0]
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {"id": DATASET, "epsilon_cap": 8.0, "delta": 1e-5}


# Retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("server disconnected without sending a response"),
        problem(500, "internal_error"),
        problem(503, "service_unavailable"),
        httpx.Response(502, text="<html>bad gateway</html>"),
    ],
    ids=["connect", "read-timeout", "dropped", "500", "503", "502-html"],
)
def test_post_is_retried_with_the_same_idempotency_key(failure: Step, sleeps: list[float]) -> None:
    script = Script(failure, failure, created_dataset())
    with client_for(script) as client:
        dataset = create(client)
    assert dataset.id == DATASET
    keys = script.keys()
    assert len(keys) == 3 and keys[0] is not None and len(set(keys)) == 1
    assert len(sleeps) == 2  # one backoff before each retry


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 415, 422, 429])
def test_4xx_is_never_retried(status: int, sleeps: list[float]) -> None:
    script = Script(problem(status, "whatever"), created_dataset())
    with client_for(script) as client, pytest.raises(LedgerError) as raised:
        create(client)
    assert len(script.requests) == 1 and sleeps == []
    assert raised.value.status == status


def test_5xx_on_every_attempt_raises_server_error_after_max_retries(sleeps: list[float]) -> None:
    script = Script(problem(500, "internal_error", "an unexpected error occurred"))
    with client_for(script, max_retries=2) as client, pytest.raises(ServerError) as raised:
        create(client)
    assert len(script.requests) == 3 and len(sleeps) == 2
    assert raised.value.attempts == 3
    assert raised.value.status == 500 and raised.value.code == "internal_error"


def test_no_answer_on_every_attempt_raises_transport_error(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectError("connection refused"))
    with client_for(script, max_retries=3) as client, pytest.raises(TransportError) as raised:
        client.dataset(DATASET)
    assert len(script.requests) == 4 and len(sleeps) == 3
    assert raised.value.attempts == 4 and raised.value.status is None
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert isinstance(raised.value, LedgerError)


def test_max_retries_zero_sends_once(sleeps: list[float]) -> None:
    script = Script(httpx.ReadTimeout("slow"))
    with client_for(script, max_retries=0) as client, pytest.raises(TransportError):
        create(client)
    assert len(script.requests) == 1 and sleeps == []


def test_backoff_is_exponential_with_full_jitter(sleeps: list[float]) -> None:
    class Highest(random.Random):
        def uniform(self, a: float, b: float) -> float:
            assert a == 0.0
            return b

    script = Script(httpx.ConnectError("refused"))
    with client_for(script) as client:
        client.retry_policy = RetryPolicy(max_retries=7, backoff=0.25, rng=Highest())
        with pytest.raises(TransportError):
            client.dataset(DATASET)
    # The ceilings double from `backoff` and stop at the cap (8 s).
    assert sleeps == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_jittered_waits_fall_between_zero_and_the_ceiling() -> None:
    policy = RetryPolicy(max_retries=3, backoff=0.5, rng=random.Random(7))
    waits = [[policy.delay(retry) for _ in range(2000)] for retry in range(4)]
    for retry, draws in enumerate(waits):
        ceiling = 0.5 * 2**retry
        assert min(draws) >= 0.0 and max(draws) <= ceiling
        # Full jitter: uniform on [0, ceiling], mean ceiling/2 (sd of the mean ≈ 0.6 % here).
        assert sum(draws) / len(draws) == pytest.approx(ceiling / 2, rel=0.05)


def test_retry_after_of_a_503_is_a_floor(sleeps: list[float]) -> None:
    busy = httpx.Response(503, headers={"retry-after": "3"}, json={"code": "service_unavailable"})
    script = Script(busy, created_dataset())
    with client_for(script, backoff=0.01) as client:
        create(client)
    assert sleeps == [3.0]


def test_patch_is_retried_only_when_the_request_was_certainly_not_sent(
    sleeps: list[float],
) -> None:
    ok = httpx.Response(200, json=dataset_body(epsilon_cap=9.0))
    script = Script(httpx.ConnectError("refused"), ok)
    with client_for(script) as client:
        assert client.update_dataset(DATASET, epsilon_cap=9.0).epsilon_cap == 9.0
    assert len(script.requests) == 2

    # A read timeout may mean the change was applied: a PATCH has no idempotency key,
    # so resending it could write a second ledger entry.
    script = Script(httpx.ReadTimeout("slow"), ok)
    with client_for(script) as client, pytest.raises(TransportError):
        client.update_dataset(DATASET, epsilon_cap=9.0)
    assert len(script.requests) == 1


def test_async_post_is_retried_with_the_same_idempotency_key(sleeps: list[float]) -> None:
    script = Script(
        httpx.ConnectError("refused"), problem(503, "service_unavailable"), created_dataset()
    )

    async def main() -> str:
        async with async_client_for(script) as client:
            dataset = await client.create_dataset(DATASET, epsilon_cap=8.0, delta=1e-5)
            return dataset.id

    assert asyncio.run(main()) == DATASET
    keys = script.keys()
    assert len(keys) == 3 and keys[0] is not None and len(set(keys)) == 1
    assert len(sleeps) == 2


def test_async_4xx_is_not_retried_and_5xx_exhaustion_raises(sleeps: list[float]) -> None:
    async def main(script: Script) -> None:
        async with async_client_for(script, max_retries=1) as client:
            await client.dataset(DATASET)

    refused = Script(problem(404, "not_found"))
    with pytest.raises(NotFound):
        asyncio.run(main(refused))
    assert len(refused.requests) == 1

    failing = Script(problem(500, "internal_error"))
    with pytest.raises(ServerError) as raised:
        asyncio.run(main(failing))
    assert len(failing.requests) == 2 and raised.value.attempts == 2


# Error mapping ------------------------------------------------------------------------------

CODES: list[tuple[int, str, type[LedgerError]]] = [
    (409, "budget_exhausted", BudgetExhausted),
    (401, "unauthorized", Unauthorized),
    (403, "forbidden", Forbidden),
    (404, "not_found", NotFound),
    (422, "idempotency_conflict", IdempotencyConflict),
    (422, "validation_error", ValidationError),
    (400, "malformed_request", BadRequest),
    (413, "payload_too_large", BadRequest),
    (415, "unsupported_media_type", BadRequest),
    (409, "conflict", Conflict),
    (409, "run_not_active", RunNotActive),
    (409, "dataset_frozen", DatasetFrozen),
    (503, "service_unavailable", ServerError),
    (500, "internal_error", ServerError),
]


@pytest.mark.parametrize(("status", "code", "expected"), CODES, ids=[c for _, c, _ in CODES])
def test_each_problem_code_maps_to_its_exception(
    status: int, code: str, expected: type[LedgerError]
) -> None:
    script = Script(problem(status, code, f"detail of {code}"))
    with client_for(script, max_retries=0) as client, pytest.raises(LedgerError) as raised:
        create(client)
    error = raised.value
    assert type(error) is expected
    assert (error.status, error.code, error.detail) == (status, code, f"detail of {code}")
    assert error.problem["code"] == code
    assert code in str(error)


def test_exception_tree() -> None:
    assert issubclass(Unauthorized, AuthError) and issubclass(Forbidden, AuthError)
    assert issubclass(RunNotActive, Conflict) and issubclass(DatasetFrozen, Conflict)
    assert not issubclass(BudgetExhausted, Conflict)
    assert issubclass(ValidationError, BadRequest)
    for cls in (BudgetExhausted, AuthError, NotFound, IdempotencyConflict, ServerError):
        assert issubclass(cls, LedgerError)
    assert issubclass(TransportError, LedgerError)


def test_budget_exhausted_carries_the_numbers() -> None:
    refusal = problem(
        409,
        "budget_exhausted",
        "the plan does not fit",
        epsilon_cap=4.3,
        epsilon_spent=1.0,
        epsilon_reserved=3.5,
        epsilon_requested=1.2,
        epsilon_after=4.6,
    )
    with client_for(Script(refusal)) as client, pytest.raises(BudgetExhausted) as raised:
        client.start_run(
            DATASET, sample_rate=0.01, steps_per_epoch=10, epochs=2, noise_multiplier=1
        )
    error = raised.value
    assert error.epsilon_cap == 4.3 and error.epsilon_spent == 1.0
    assert error.epsilon_reserved == 3.5 and error.epsilon_requested == 1.2
    assert error.epsilon_after == 4.6


def test_validation_error_lists_the_field_errors() -> None:
    errors = [{"loc": ["body", "epsilon_cap"], "msg": "must be >= 0", "type": "greater_than"}]
    answer = problem(422, "validation_error", "body.epsilon_cap: must be >= 0", errors=errors)
    with client_for(Script(answer)) as client, pytest.raises(ValidationError) as raised:
        create(client)
    assert raised.value.errors == errors


@pytest.mark.parametrize(
    ("status", "expected"),
    [(401, Unauthorized), (403, Forbidden), (404, NotFound), (409, Conflict), (418, LedgerError)],
)
def test_unknown_code_falls_back_to_the_status(status: int, expected: type[LedgerError]) -> None:
    answer = httpx.Response(status, text="nope")  # not even JSON
    with client_for(Script(answer)) as client, pytest.raises(LedgerError) as raised:
        client.dataset(DATASET)
    assert type(raised.value) is expected
    assert raised.value.detail == "nope" and raised.value.code is None


def test_a_success_without_json_is_a_clear_error() -> None:
    client = client_for(Script(httpx.Response(200, text="<html>")))
    with client, pytest.raises(LedgerError, match="without a JSON body"):
        client.dataset(DATASET)


def test_a_body_missing_fields_is_a_clear_error() -> None:
    body = {"id": DATASET, "description": ""}
    client = client_for(Script(httpx.Response(200, json=body)))
    with client, pytest.raises(LedgerError, match="'epsilon_cap' is missing"):
        client.dataset(DATASET)


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(httpx.Response(200, json=dataset_body()))
    monkeypatch.setenv("LEDGER_API_KEY", "pl_from_env")
    with LedgerClient(URL, transport=httpx.MockTransport(script)) as client:
        client.dataset(DATASET)
    assert script.requests[0].headers["authorization"] == "Bearer pl_from_env"
    monkeypatch.delenv("LEDGER_API_KEY")
    with pytest.raises(ValueError, match="API key"):
        LedgerClient(URL)


def test_repr_does_not_show_the_key() -> None:
    with client_for(Script(created_dataset())) as client:
        assert KEY not in repr(client)


# Dry runs -----------------------------------------------------------------------------------


def test_a_refused_dry_run_raises_what_the_real_call_would() -> None:
    refusal = {
        "dry_run": True,
        "admitted": False,
        "refusal": {
            "status": 409,
            "code": "budget_exhausted",
            "detail": "does not fit",
            "epsilon_after": 9.0,
        },
    }
    script = Script(httpx.Response(200, json=refusal))
    with client_for(script) as client, pytest.raises(BudgetExhausted) as raised:
        client.release(DATASET, mechanism="laplace", epsilon=1.0, dry_run=True)
    assert raised.value.epsilon_after == 9.0
    assert script.requests[0].url.params["dry_run"] == "true"


def test_an_admitted_dry_run_returns_the_would_be_release() -> None:
    body = {
        "id": None,
        "dataset_id": DATASET,
        "mechanism": "laplace",
        "sensitivity": 1.0,
        "noise_scale": 10.0,
        "epsilon": 0.1,
        "delta": None,
        "name": None,
        "ledger_seq": None,
        "noised_values": None,
        "created_at": "2026-11-23T09:30:00Z",
        "dataset": dataset_body(),
        "effect": effect_body(),
        "dry_run": True,
        "admitted": True,
    }
    with client_for(Script(httpx.Response(200, json=body))) as client:
        release = client.release(DATASET, mechanism="laplace", epsilon=0.1, dry_run=True)
    assert release.dry_run and release.id is None and release.noise_scale == 10.0


def test_noisy_sends_the_values_and_returns_the_noised_ones() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        assert sent["values"] == [1.0, 2.0] and sent["sensitivity"] == 2.0
        body = {
            "id": "rel_1",
            "dataset_id": DATASET,
            "mechanism": sent["mechanism"],
            "sensitivity": 2.0,
            "noise_scale": 4.0,
            "epsilon": 0.5,
            "delta": None,
            "name": None,
            "ledger_seq": 7,
            "noised_values": [1.5, 0.25],
            "created_at": "2026-11-23T09:30:00Z",
            "dataset": dataset_body(),
            "effect": effect_body(),
        }
        return httpx.Response(201, json=body)

    transport = httpx.MockTransport(answer)
    with LedgerClient(URL, KEY, transport=transport) as client:
        noised = client.noisy(DATASET, [1, 2], mechanism="laplace", sensitivity=2.0, epsilon=0.5)
    assert noised == [1.5, 0.25]


# Pagination ---------------------------------------------------------------------------------


def test_ledger_iterates_every_page_by_seq_cursor() -> None:
    fake = FakeLedger(ledger_entries=1234)
    with fake.client() as client:
        entries = list(client.ledger(DATASET, kind="charge", run_id="run_1", page_size=500))
    assert [e.seq for e in entries] == list(range(1, 1235))
    params = [dict(r.url.params) for r in fake.requests]
    assert [p.get("after") for p in params] == [None, "500", "1000"]
    assert all(p["limit"] == "500" and p["kind"] == "charge" for p in params)
    assert all(p["run_id"] == "run_1" for p in params)


def test_ledger_pages_are_fetched_lazily_and_can_start_after_a_seq() -> None:
    fake = FakeLedger(ledger_entries=30)
    with fake.client() as client:
        entries = client.ledger(DATASET, after=20, page_size=4)
        first = next(iter(entries))
        assert first.seq == 21 and len(fake.requests) == 1
        assert [e.seq for e in entries] == list(range(22, 31))
    assert len(fake.requests) == 3


def test_ledger_of_an_empty_page_stops() -> None:
    with FakeLedger(ledger_entries=0).client() as client:
        assert list(client.ledger(DATASET)) == []


def test_async_ledger_iterates_every_page() -> None:
    fake = FakeLedger(ledger_entries=11)

    async def main() -> list[int]:
        async with fake.async_client() as client:
            return [e.seq async for e in client.ledger(DATASET, page_size=5)]

    assert asyncio.run(main()) == list(range(1, 12))
    assert len(fake.requests) == 3


def test_datasets_pages_by_id_cursor() -> None:
    pages = {
        None: {"data": [dataset_body(id="a"), dataset_body(id="b")], "has_more": True},
        "b": {"data": [dataset_body(id="c")], "has_more": False},
    }

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("after")])

    with LedgerClient(URL, KEY, transport=httpx.MockTransport(answer)) as client:
        assert [d.id for d in client.datasets(page_size=2)] == ["a", "b", "c"]


def test_ledger_entry_fields() -> None:
    body = entry_body(3)
    with client_for(Script(httpx.Response(200, json={"data": [body], "has_more": False}))) as c:
        (entry,) = list(c.ledger(DATASET))
    assert entry.seq == 3 and entry.kind == "charge" and entry.epsilon == 0.1
    assert entry.hash == body["hash"] and entry.created_at is not None
    assert entry.raw == body
