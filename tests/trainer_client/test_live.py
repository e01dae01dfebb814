"""The client against the real service over real HTTP (skipped when the service is absent)."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.trainer_client.conftest import LedgerServer, NewDataset
from trainer_client import (
    AsyncLedgerClient,
    BudgetExhausted,
    DatasetFrozen,
    LedgerClient,
    NotFound,
    RunNotActive,
    ValidationError,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_dp_sgd.py"

# A small plan: about 1.3 ε at δ=1e-5 for 3 epochs of 100 steps at q=0.01, σ≈1.17.
PLAN: dict[str, Any] = {
    "sample_rate": 0.01,
    "steps_per_epoch": 100,
    "epochs": 3,
    "target_epsilon": 1.0,
    "max_grad_norm": 1.0,
}


class Boom(Exception):
    """An error in the user's training code."""


def charges(client: LedgerClient, dataset_id: str, run_id: str) -> list[Any]:
    return list(client.ledger(dataset_id, kind="charge", run_id=run_id))


def test_run_loop_plans_charges_every_epoch_and_completes(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    dataset_id = new_dataset(epsilon_cap=5.0)
    with ledger_server.client() as client:
        with client.start_run(dataset_id, **PLAN, name="live") as run:
            held = client.dataset(dataset_id)
            assert held.epsilon_spent == 0.0 and held.epsilon_reserved > 0.0
            assert run.epsilon == pytest.approx(1.0, rel=1e-3)  # the plan's own ε
            seen = []
            for epoch in run:
                assert epoch.noise_multiplier == run.noise_multiplier
                assert (epoch.sample_rate, epoch.steps) == (0.01, 100)
                assert epoch.max_grad_norm == 1.0 and not epoch.beyond_plan
                seen.append((epoch.index, epoch.epsilon_spent))
        assert [i for i, _ in seen] == [1, 2, 3]
        spent = [s for _, s in seen]
        assert spent == sorted(spent) and spent[-1] == pytest.approx(held.epsilon_reserved)
        assert run.status == "completed" and run.stopped_reason is None
        assert client.run(run.id).status == "completed"

        entries = charges(client, dataset_id, run.id)
        assert [e.kind for e in entries] == ["charge"] * 3
        assert all(e.mechanism and e.mechanism["steps"] == 100 for e in entries)
        assert all(e.idempotency_key for e in entries)  # the client's automatic keys
        kinds = [e.kind for e in client.ledger(dataset_id, page_size=2)]
        assert kinds == ["dataset_created", "hold", "charge", "charge", "charge", "release_hold"]
        assert client.verify(dataset_id).ok
        after = client.dataset(dataset_id)
        assert after.epsilon_spent == pytest.approx(after.epsilon_reserved)
        assert after.active_runs == 0


class DroppingProxy:
    """A loopback HTTP proxy to the ledger that swallows the first answer to a matching request.

    It forwards the request (so the service does the work and charges), then
    closes the client's connection without a response: exactly what a network
    failure after the server committed looks like to the client.
    """

    def __init__(self, upstream: str, drop: Callable[[str, str], bool], times: int = 1) -> None:
        self.upstream = httpx.Client(base_url=upstream, timeout=30)
        self.drop = drop
        self.left_to_drop = times
        self.dropped = 0
        self.seen: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                skip = {"host", "content-length", "connection"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                with proxy.lock:
                    key = self.headers.get("idempotency-key")
                    proxy.seen.append((self.command, self.path, key))
                answer = proxy.upstream.request(
                    self.command, self.path, content=body, headers=headers
                )
                with proxy.lock:
                    drop = proxy.left_to_drop > 0 and proxy.drop(self.command, self.path)
                    if drop:
                        proxy.left_to_drop -= 1
                        proxy.dropped += 1
                if drop:
                    self.close_connection = True  # hang up without a single byte of answer
                    return
                payload = answer.content
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in {"content-length", "transfer-encoding", "connection"}:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = forward  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()


@pytest.fixture
def dropping_proxy(ledger_server: LedgerServer) -> Iterator[DroppingProxy]:
    proxy = DroppingProxy(
        ledger_server.url, lambda method, path: method == "POST" and path.endswith("/epochs")
    )
    yield proxy
    proxy.close()


def test_a_retried_epoch_whose_answer_was_lost_is_charged_once(
    ledger_server: LedgerServer, new_dataset: NewDataset, dropping_proxy: DroppingProxy
) -> None:
    dataset_id = new_dataset(epsilon_cap=5.0)
    with LedgerClient(dropping_proxy.url, ledger_server.admin_key) as client:
        run = client.start_run(dataset_id, **PLAN)
        first = run.reserve_epoch()  # answer dropped once, retried with the same key
        second = run.reserve_epoch()
        run.complete()
    assert dropping_proxy.dropped == 1
    epoch_posts = [s for s in dropping_proxy.seen if s[1].endswith("/epochs")]
    assert len(epoch_posts) == 3  # first try, its retry, then the second epoch
    assert epoch_posts[0][2] is not None and epoch_posts[0][2] == epoch_posts[1][2]
    assert epoch_posts[2][2] != epoch_posts[0][2]
    assert (first.index, second.index) == (1, 2)
    with ledger_server.client() as admin:
        entries = charges(admin, dataset_id, run.id)
        assert len(entries) == 2  # not 3: the retry was replayed, not charged again
        assert entries[0].idempotency_key == epoch_posts[0][2]
        assert admin.run(run.id).epochs_charged == 2
        assert admin.verify(dataset_id).ok


def test_a_refused_extra_epoch_stops_the_loop_and_releases_the_hold(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    dataset_id = new_dataset(epsilon_cap=2.0)
    with ledger_server.client() as client:
        with client.start_run(dataset_id, **PLAN) as run:
            indices = [epoch.index for epoch in run.iterate(epochs=1000)]
        reason = run.stopped_reason
        assert isinstance(reason, BudgetExhausted)
        assert 3 <= len(indices) < 1000 and indices == list(range(1, len(indices) + 1))
        assert reason.epsilon_cap == 2.0 and reason.epsilon_after is not None
        assert reason.epsilon_after > 2.0
        assert run.status == "aborted"
        dataset = client.dataset(dataset_id)
        assert dataset.active_runs == 0 and dataset.epsilon_spent <= 2.0
        assert dataset.epsilon_reserved == pytest.approx(dataset.epsilon_spent)
        assert len(charges(client, dataset_id, run.id)) == len(indices)


def test_a_second_run_that_does_not_fit_is_refused_at_planning(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    # Default shares on a cap of 1.6: their heavy order suits this plan (on a cap of 1.5 it
    # would not, and one such run reports 1.53; docs/accounting.md §3.3). Runs are planned
    # until one does not fit.
    dataset_id = new_dataset(epsilon_cap=1.6)
    with ledger_server.client() as client:
        first = client.start_run(dataset_id, **PLAN)
        held = [first]
        with pytest.raises(BudgetExhausted) as raised:
            for _ in range(10):
                held.append(client.start_run(dataset_id, **PLAN))
        assert 2 <= len(held) < 10
        assert raised.value.epsilon_cap == 1.6
        assert raised.value.epsilon_reserved == pytest.approx(
            client.dataset(dataset_id).epsilon_reserved
        )
        with pytest.raises(BudgetExhausted):
            client.preview_run(dataset_id, **PLAN)  # a dry run says the same, writing nothing
        held[-1].abort()
        assert client.preview_run(dataset_id, **PLAN).dry_run


def test_a_run_ended_elsewhere_stops_the_loop_with_run_not_active(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    dataset_id = new_dataset(epsilon_cap=5.0)
    with ledger_server.client() as client, ledger_server.client() as other:
        with client.start_run(dataset_id, **PLAN) as run:
            indices = []
            for epoch in run:
                indices.append(epoch.index)
                other.run(run.id).abort()  # e.g. an operator stops it
        assert indices == [1]
        assert isinstance(run.stopped_reason, RunNotActive)
        assert client.run(run.id).status == "aborted"


def test_freezing_the_dataset_stops_the_loop_and_releases_the_hold(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    dataset_id = new_dataset(epsilon_cap=5.0)
    with ledger_server.client() as client:
        with client.start_run(dataset_id, **PLAN) as run:
            indices = []
            for epoch in run:
                indices.append(epoch.index)
                client.update_dataset(dataset_id, frozen=True, reason="audit")
        assert indices == [1]
        assert isinstance(run.stopped_reason, DatasetFrozen)
        assert run.status == "aborted"
        dataset = client.dataset(dataset_id)
        assert dataset.frozen and dataset.active_runs == 0
        assert dataset.epsilon_reserved == pytest.approx(dataset.epsilon_spent)


@pytest.mark.parametrize("use_with", [True, False], ids=["with", "bare-for"])
def test_an_exception_in_training_aborts_the_run_and_releases_the_hold(
    ledger_server: LedgerServer, new_dataset: NewDataset, use_with: bool
) -> None:
    dataset_id = new_dataset(epsilon_cap=5.0)
    with ledger_server.client() as client:
        run = client.start_run(dataset_id, **PLAN)
        held = client.dataset(dataset_id)
        assert held.epsilon_reserved > held.epsilon_spent
        with pytest.raises(Boom):
            if use_with:
                with run:
                    for _ in run:
                        raise Boom
            else:
                for _ in run:
                    raise Boom
        assert client.run(run.id).status == "aborted"
        after = client.dataset(dataset_id)
        assert after.active_runs == 0
        assert after.epsilon_reserved == pytest.approx(after.epsilon_spent)
        assert after.epsilon_reserved < held.epsilon_reserved
        kinds = [e.kind for e in client.ledger(dataset_id, run_id=run.id)]
        assert kinds == ["hold", "charge", "release_hold"]


def test_async_twin_does_a_run(ledger_server: LedgerServer, new_dataset: NewDataset) -> None:
    dataset_id = new_dataset(epsilon_cap=5.0)

    async def main() -> tuple[list[int], str, list[str]]:
        async with AsyncLedgerClient(ledger_server.url, ledger_server.admin_key) as client:
            run = await client.start_run(dataset_id, **PLAN)
            async with run:
                indices = [epoch.index async for epoch in run]
            kinds = [e.kind async for e in client.ledger(dataset_id, run_id=run.id)]
            return indices, (await client.run(run.id)).status, kinds

    indices, status, kinds = asyncio.run(main())
    assert indices == [1, 2, 3] and status == "completed"
    assert kinds == ["hold", "charge", "charge", "charge", "release_hold"]


def test_scoped_trainer_key_releases_and_calculators(
    ledger_server: LedgerServer, new_dataset: NewDataset
) -> None:
    dataset_id = new_dataset(epsilon_cap=5.0)
    other_id = new_dataset(epsilon_cap=5.0)
    with ledger_server.client() as admin:
        key = admin.create_key("trainer", datasets=[dataset_id], name="tc-test")
        assert key.key is not None and key.key not in repr(key)
    with ledger_server.client(key.key) as trainer:
        release = trainer.release(dataset_id, mechanism="laplace", sensitivity=2.0, epsilon=0.5)
        assert release.noise_scale == pytest.approx(4.0) and release.ledger_seq is not None
        assert release.dataset is not None and release.dataset.epsilon_spent > 0
        noised = trainer.noisy(
            dataset_id, [1.0, 2.0, 3.0], mechanism="laplace", sensitivity=1.0, epsilon=1.0
        )
        assert len(noised) == 3 and noised != [1.0, 2.0, 3.0]
        with pytest.raises(NotFound):  # outside the key's scope: as if it did not exist
            trainer.dataset(other_id)
        with pytest.raises(ValidationError):
            trainer.release(dataset_id, mechanism="laplace")  # neither epsilon nor noise_scale
        estimate = trainer.epsilon(sample_rate=0.01, noise_multiplier=1.0, steps=1000, delta=1e-5)
        calibration = trainer.noise_multiplier(
            sample_rate=0.01, steps=1000, target_epsilon=estimate.epsilon, delta=1e-5
        )
        assert calibration.noise_multiplier == pytest.approx(1.0, rel=1e-3)
    with ledger_server.client() as admin:
        revoked = admin.revoke_key(key.id)
        assert revoked.revoked_at is not None
        kinds = [e.kind for e in admin.ledger(dataset_id)]
        assert kinds == ["dataset_created", "charge", "charge"]
        assert admin.ledger_csv(dataset_id).splitlines()[0].startswith("seq,")


def test_the_example_trains_until_the_ledger_refuses(
    ledger_server: LedgerServer, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("train_dp_sgd", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    dataset_id = "tc-example-" + uuid.uuid4().hex[:8]
    common = ["--url", ledger_server.url, "--api-key", ledger_server.admin_key]
    common += ["--dataset", dataset_id, "--records", "200", "--sample-rate", "0.1"]
    # A plan of ε=1.5 over 2 epochs, in a cap that admits one epoch more (default shares:
    # ≈ 1.20, 1.51, 1.82; a fourth would reach 2.13).
    argv = [*common, "--create-dataset-cap", "2.0", "--epochs", "2", "--target-epsilon", "1.5"]
    assert example.main([*argv, "--beyond-plan"]) == 0
    out = capsys.readouterr().out
    assert f"created dataset {dataset_id!r}" in out
    assert "\repoch 1/2 [" in out and "dataset ε" in out and "(beyond plan)" in out
    assert "stopped: the ledger refused the next epoch" in out
    with ledger_server.client() as admin:
        dataset = admin.dataset(dataset_id)
        assert 0 < dataset.epsilon_spent <= 2.0 and dataset.active_runs == 0
        (run,) = list(admin.runs(dataset_id))
        assert run.epochs_charged == 3

    # The budget is spent: a new plan is refused, and that is a clean exit too.
    assert example.main([*common, "--epochs", "2", "--target-epsilon", "1.5"]) == 0
    assert "the ledger refused the plan" in capsys.readouterr().out
