"""How a run's epoch loop ends, against the in-memory fake (sync and async)."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import httpx
import pytest

from tests.trainer_client.fake_ledger import DATASET, FakeLedger
from trainer_client import (
    AsyncLedgerClient,
    BudgetExhausted,
    LedgerClient,
    RunNotActive,
    TransportError,
)

PLAN: dict[str, Any] = {
    "sample_rate": 0.01,
    "steps_per_epoch": 100,
    "epochs": 3,
    "target_epsilon": 3.0,
    "max_grad_norm": 1.0,
}
START = "POST /v1/datasets/mnist/runs"
EPOCH = "POST /v1/runs/{run}/epochs"
COMPLETE = "POST /v1/runs/{run}/complete"
ABORT = "POST /v1/runs/{run}/abort"


class Boom(Exception):
    """An error in the user's training code."""


def test_start_run_sends_the_plan() -> None:
    fake = FakeLedger()
    with fake.client() as client:
        run = client.start_run(DATASET, **PLAN, name="mlp", lease_seconds=600)
    sent = json.loads(fake.requests[0].content)
    assert sent == {**PLAN, "sampling": "poisson", "name": "mlp", "lease_seconds": 600}
    assert run.id == "run_1" and run.noise_multiplier == 1.1 and run.epsilon == 2.99
    assert run.epochs == 3 and run.status == "active" and run.epochs_charged == 0


def test_loop_reserves_each_epoch_before_yielding_it_and_completes_at_the_end() -> None:
    fake = FakeLedger()
    seen: list[tuple[int, int]] = []
    with fake.client() as client:
        run = client.start_run(DATASET, **PLAN)
        for epoch in run:
            # The epoch was charged before the body runs, and only that one.
            seen.append((epoch.index, fake.runs[run.id].epochs_charged))
            assert epoch.noise_multiplier == 1.1 and epoch.steps == 100
            assert epoch.epsilon_spent == pytest.approx(0.8 * epoch.index)
            assert epoch.epsilon_cap == 8.0
    assert seen == [(1, 1), (2, 2), (3, 3)]
    assert fake.calls() == [START, EPOCH, EPOCH, EPOCH, COMPLETE]
    assert run.status == "completed" and run.finished and run.stopped_reason is None
    assert run.last_epoch is not None and run.last_epoch.index == 3


def test_loop_inside_with_completes_once() -> None:
    fake = FakeLedger()
    with fake.client() as client, client.start_run(DATASET, **PLAN) as run:
        epochs = [epoch.index for epoch in run]
    assert epochs == [1, 2, 3]
    assert fake.calls().count(COMPLETE) == 1 and ABORT not in fake.calls()
    assert run.status == "completed"


def test_exception_in_the_loop_body_aborts_and_propagates() -> None:
    fake = FakeLedger()
    with fake.client() as client:
        run = client.start_run(DATASET, **PLAN)
        with pytest.raises(Boom):
            for epoch in run:
                if epoch.index == 2:
                    raise Boom
    assert fake.calls() == [START, EPOCH, EPOCH, ABORT]
    assert run.status == "aborted" and run.stopped_reason is None


def test_exception_inside_with_aborts_and_propagates() -> None:
    fake = FakeLedger()
    with fake.client() as client:
        with pytest.raises(Boom), client.start_run(DATASET, **PLAN) as run:
            for epoch in run:
                if epoch.index == 2:
                    raise Boom
        assert fake.calls() == [START, EPOCH, EPOCH, ABORT]
        assert run.status == "aborted"


def test_exception_after_the_loop_inside_with_aborts() -> None:
    fake = FakeLedger()
    with fake.client() as client:
        with pytest.raises(Boom), client.start_run(DATASET, **PLAN) as run:
            for _ in run.iterate(epochs=1):
                pass
            raise Boom
        # iterate(epochs=1) ran its epoch; the loop ending normally completed the run.
        assert fake.calls() == [START, EPOCH, COMPLETE]


def test_break_inside_with_completes() -> None:
    fake = FakeLedger()
    with fake.client() as client, client.start_run(DATASET, **PLAN) as run:
        for epoch in run:
            if epoch.index == 2:
                break
    assert fake.calls() == [START, EPOCH, EPOCH, COMPLETE]
    assert run.status == "completed"


def test_break_without_with_fails_safe_and_aborts() -> None:
    fake = FakeLedger()
    with fake.client() as client:
        run = client.start_run(DATASET, **PLAN)
        for epoch in run:
            if epoch.index == 1:
                break
        gc.collect()  # CPython closes the generator at `break` already; others on collection
    assert fake.calls() == [START, EPOCH, ABORT]
    assert run.status == "aborted"


def test_refused_epoch_stops_the_loop_cleanly_and_releases_the_hold() -> None:
    fake = FakeLedger(admit_epochs=2)
    with fake.client() as client, client.start_run(DATASET, **PLAN) as run:
        epochs = [epoch.index for epoch in run]
    assert epochs == [1, 2]
    assert isinstance(run.stopped_reason, BudgetExhausted)
    assert run.stopped_reason.epsilon_after == 8.3
    assert fake.calls() == [START, EPOCH, EPOCH, EPOCH, ABORT]
    assert run.status == "aborted"


def test_run_not_active_stops_the_loop_without_an_abort() -> None:
    fake = FakeLedger(expire_after=1)
    with fake.client() as client:
        run = client.start_run(DATASET, **PLAN)
        epochs = [epoch.index for epoch in run]
    assert epochs == [1]
    assert isinstance(run.stopped_reason, RunNotActive)
    assert fake.calls() == [START, EPOCH, EPOCH]  # nothing left to release
    assert run.finished


def test_iterating_beyond_the_plan_until_refused() -> None:
    fake = FakeLedger(admit_epochs=5)
    with fake.client() as client, client.start_run(DATASET, **PLAN) as run:
        beyond = [epoch.beyond_plan for epoch in run.iterate(epochs=100)]
    assert beyond == [False, False, False, True, True]
    assert isinstance(run.stopped_reason, BudgetExhausted)
    assert run.epochs_charged == 5


def test_manual_reserve_epoch_raises_refusals() -> None:
    fake = FakeLedger(admit_epochs=1)
    with fake.client() as client:
        run = client.start_run(DATASET, **PLAN)
        assert run.reserve_epoch().index == 1
        with pytest.raises(BudgetExhausted):
            run.reserve_epoch()
        assert run.complete().status == "completed"
        with pytest.raises(RunNotActive):
            run.complete()


def test_loop_resumes_after_manual_epochs_and_from_an_existing_run() -> None:
    fake = FakeLedger()
    with fake.client() as client:
        run = client.start_run(DATASET, **PLAN)
        run.reserve_epoch()
        resumed = client.run(run.id)  # e.g. after a restart
        assert resumed.epochs_charged == 1
        assert [epoch.index for epoch in resumed] == [2, 3]
        assert resumed.status == "completed"


def test_a_transport_failure_in_the_loop_is_raised_and_the_run_aborted(
    sleeps: list[float],
) -> None:
    fake = FakeLedger()
    down = {"now": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if down["now"] and request.url.path.endswith("/epochs"):
            raise httpx.ConnectError("connection refused")
        return fake.handle(request)

    transport = httpx.MockTransport(handler)
    client = LedgerClient("http://ledger.test", "k", transport=transport, max_retries=2)
    with client, pytest.raises(TransportError), client.start_run(DATASET, **PLAN) as run:
        for _ in run:
            down["now"] = True
    assert run.status == "aborted" and run.stopped_reason is None
    assert len(sleeps) == 2


def test_iterating_twice_at_once_is_refused() -> None:
    with FakeLedger().client() as client, client.start_run(DATASET, **PLAN) as run:
        outer = iter(run)
        next(outer)
        with pytest.raises(RuntimeError, match="already being iterated"):
            next(iter(run))
        for _ in outer:
            pass


# The async twin ------------------------------------------------------------------------------


def async_client(fake: FakeLedger) -> AsyncLedgerClient:
    return fake.async_client()


def test_async_loop_completes_at_the_end() -> None:
    fake = FakeLedger()

    async def main() -> list[int]:
        async with async_client(fake) as client:
            run = await client.start_run(DATASET, **PLAN)
            async with run:
                indices = [epoch.index async for epoch in run]
            assert run.status == "completed"
            return indices

    assert asyncio.run(main()) == [1, 2, 3]
    assert fake.calls() == [START, EPOCH, EPOCH, EPOCH, COMPLETE]


def test_async_bare_loop_completes_at_the_end() -> None:
    fake = FakeLedger()

    async def main() -> None:
        async with async_client(fake) as client:
            run = await client.start_run(DATASET, **PLAN)
            async for _ in run:
                pass

    asyncio.run(main())
    assert fake.calls() == [START, EPOCH, EPOCH, EPOCH, COMPLETE]


def test_async_exception_aborts_and_propagates() -> None:
    fake = FakeLedger()

    async def main() -> None:
        async with async_client(fake) as client:
            run = await client.start_run(DATASET, **PLAN)
            async with run:
                async for epoch in run:
                    if epoch.index == 2:
                        raise Boom

    with pytest.raises(Boom):
        asyncio.run(main())
    assert fake.calls() == [START, EPOCH, EPOCH, ABORT]


def test_async_break_inside_with_completes() -> None:
    fake = FakeLedger()

    async def main() -> None:
        async with async_client(fake) as client:
            run = await client.start_run(DATASET, **PLAN)
            async with run:
                async for _ in run:
                    break

    asyncio.run(main())
    assert fake.calls() == [START, EPOCH, COMPLETE]


def test_async_refused_epoch_stops_the_loop_cleanly() -> None:
    fake = FakeLedger(admit_epochs=1)

    async def main() -> tuple[list[int], object, str]:
        async with async_client(fake) as client:
            run = await client.start_run(DATASET, **PLAN)
            async with run:
                indices = [epoch.index async for epoch in run]
            return indices, run.stopped_reason, run.status

    indices, reason, status = asyncio.run(main())
    assert indices == [1] and isinstance(reason, BudgetExhausted) and status == "aborted"
    assert fake.calls() == [START, EPOCH, EPOCH, ABORT]


def test_async_run_not_active_stops_without_abort() -> None:
    fake = FakeLedger(expire_after=2)

    async def main() -> object:
        async with async_client(fake) as client:
            run = await client.start_run(DATASET, **PLAN)
            async for _ in run:
                pass
            return run.stopped_reason

    assert isinstance(asyncio.run(main()), RunNotActive)
    assert fake.calls() == [START, EPOCH, EPOCH, EPOCH]
