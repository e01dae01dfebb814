"""The asynchronous twin: `AsyncLedgerClient` and `AsyncRun`, the sync surface with `await`.

Everything that decides what to send, when to retry and what an answer means
is shared with the sync client (`trainer_client._http`, `trainer_client._calls`),
and so are the clients' and runs' state and properties (`trainer_client._base`);
see `LedgerClient` and `Run` for the full story of each method.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from trainer_client import _calls, _http
from trainer_client._base import (
    DEFAULT_PAGE_SIZE,
    EPOCH_REFUSALS,
    ClientBase,
    RunBase,
    default_headers,
    labels,
    noised_batch,
    noised_values,
    resolve_api_key,
)
from trainer_client._http import Call, Pages
from trainer_client.errors import LedgerError, RunNotActive
from trainer_client.models import (
    ApiKey,
    Dataset,
    Epoch,
    EpsilonEstimate,
    LedgerEntry,
    NoiseCalibration,
    Release,
    RunRecord,
    VerifyResult,
)

__all__ = ["AsyncLedgerClient", "AsyncRun"]


class AsyncLedgerClient(ClientBase[httpx.AsyncClient]):
    """The async twin of `LedgerClient` (``async with AsyncLedgerClient(url, key) as client:``).

    Same arguments, same retries and idempotency keys, same exceptions;
    `transport` is an ``httpx.AsyncBaseTransport``. Listing methods return
    async iterators (``async for entry in client.ledger("mnist")``).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, max_retries=max_retries, backoff=backoff)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=default_headers(resolve_api_key(api_key)),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the underlying connections."""
        await self._http.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        """Send `call`, retrying per the retry policy; raise the mapped error on failure."""
        request = _http.build_request(self._http, call)
        retry = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                wait = _http.retry_wait(self.retry_policy, request, retry, exc)
                if wait is None:
                    raise _http.transport_failure(request, exc, retry + 1) from exc
            else:
                wait = _http.retry_wait(self.retry_policy, request, retry, response)
                if wait is None:
                    _http.raise_for_status(response, retry + 1)
                    return response
                await response.aclose()
            await _http.async_sleep(wait)
            retry += 1

    async def _json(self, call: Call) -> Any:
        return _http.json_of(await self._send(call))

    async def _paginate(self, pages: Pages) -> AsyncIterator[Any]:
        after: Any = None
        while True:
            items, has_more = _http.page(await self._json(pages.call_after(after)))
            for item in items:
                yield item
            if not has_more or not items:
                return
            after = items[-1][pages.cursor_key]

    # Datasets -----------------------------------------------------------------------------

    async def dataset(self, dataset_id: str) -> Dataset:
        """The dataset's budget as it stands now."""
        return Dataset.from_json(await self._json(_calls.get_dataset(dataset_id)))

    async def datasets(self, *, page_size: int = 100) -> AsyncIterator[Dataset]:
        """Every dataset this key may see, fetching pages as the iteration goes."""
        async for item in self._paginate(_calls.list_datasets(limit=page_size)):
            yield Dataset.from_json(item)

    async def create_dataset(
        self,
        dataset_id: str,
        *,
        epsilon_cap: float,
        delta: float,
        description: str | None = None,
        idempotency_key: str | None = None,
        shares: Mapping[str, Any] | None = None,
    ) -> Dataset:
        """Create a dataset with its budget (admin). `shares`: how its filter shares δ, e.g.
        `{"profile": "default"}` (absent: `first_admission`, fixed by its first admission;
        docs/api.md lists the profiles)."""
        call = _calls.create_dataset(
            dataset_id,
            epsilon_cap=epsilon_cap,
            delta=delta,
            description=description,
            idempotency_key=idempotency_key,
            shares=shares,
        )
        return Dataset.from_json(await self._json(call))

    async def update_dataset(
        self,
        dataset_id: str,
        *,
        epsilon_cap: float | None = None,
        frozen: bool | None = None,
        description: str | None = None,
        reason: str | None = None,
    ) -> Dataset:
        """Change a dataset's cap, frozen flag or description (admin)."""
        call = _calls.update_dataset(
            dataset_id,
            epsilon_cap=epsilon_cap,
            frozen=frozen,
            description=description,
            reason=reason,
        )
        return Dataset.from_json(await self._json(call))

    # Runs ---------------------------------------------------------------------------------

    async def start_run(
        self,
        dataset_id: str,
        *,
        sample_rate: float,
        steps_per_epoch: int,
        epochs: int,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        sampling: str = "poisson",
        max_grad_norm: float | None = None,
        name: str | None = None,
        lease_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncRun:
        """Plan a DP-SGD run (see `LedgerClient.start_run`); iterate it with ``async for``."""
        call = _calls.create_run(
            dataset_id,
            sample_rate=sample_rate,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            sampling=sampling,
            max_grad_norm=max_grad_norm,
            name=name,
            lease_seconds=lease_seconds,
            dry_run=False,
            idempotency_key=idempotency_key,
        )
        return AsyncRun(self, RunRecord.from_json(await self._json(call)))

    async def preview_run(
        self,
        dataset_id: str,
        *,
        sample_rate: float,
        steps_per_epoch: int,
        epochs: int,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        sampling: str = "poisson",
        max_grad_norm: float | None = None,
        lease_seconds: int | None = None,
    ) -> RunRecord:
        """A dry run of :meth:`start_run` (see `LedgerClient.preview_run`)."""
        call = _calls.create_run(
            dataset_id,
            sample_rate=sample_rate,
            steps_per_epoch=steps_per_epoch,
            epochs=epochs,
            target_epsilon=target_epsilon,
            noise_multiplier=noise_multiplier,
            sampling=sampling,
            max_grad_norm=max_grad_norm,
            name=None,
            lease_seconds=lease_seconds,
            dry_run=True,
            idempotency_key=None,
        )
        return RunRecord.from_json(await self._json(call))

    async def run(self, run_id: str) -> AsyncRun:
        """A handle on an existing run."""
        return AsyncRun(self, RunRecord.from_json(await self._json(_calls.get_run(run_id))))

    async def runs(
        self, dataset_id: str, *, status: str | None = None, page_size: int = 100
    ) -> AsyncIterator[RunRecord]:
        """Every run of a dataset (optionally only those with `status`), page by page."""
        pages = _calls.list_runs(dataset_id, status=status, limit=page_size)
        async for item in self._paginate(pages):
            yield RunRecord.from_json(item)

    async def _reserve_epoch(
        self, run_id: str, *, dry_run: bool, idempotency_key: str | None
    ) -> Epoch:
        call = _calls.reserve_epoch(run_id, dry_run=dry_run, idempotency_key=idempotency_key)
        return Epoch.from_json(await self._json(call))

    async def _finish_run(self, run_id: str, how: str, idempotency_key: str | None) -> RunRecord:
        call = _calls.finish_run(run_id, how, idempotency_key=idempotency_key)
        return RunRecord.from_json(await self._json(call))

    # Releases -----------------------------------------------------------------------------

    async def release(
        self,
        dataset_id: str,
        *,
        mechanism: str,
        sensitivity: float = 1.0,
        epsilon: float | None = None,
        delta: float | None = None,
        noise_scale: float | None = None,
        name: str | None = None,
        count: int = 1,
        dry_run: bool = False,
        idempotency_key: str | None = None,
    ) -> Release:
        """Charge one noisy release (see `LedgerClient.release`)."""
        call = _calls.create_release(
            dataset_id,
            mechanism=mechanism,
            sensitivity=sensitivity,
            epsilon=epsilon,
            delta=delta,
            noise_scale=noise_scale,
            values=None,
            name=name,
            dry_run=dry_run,
            idempotency_key=idempotency_key,
            count=count,
        )
        return Release.from_json(await self._json(call))

    async def noisy(
        self,
        dataset_id: str,
        values: Sequence[float],
        *,
        mechanism: str,
        sensitivity: float,
        epsilon: float,
        delta: float | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> list[float]:
        """Charge one release with service-side noise on `values` (see `LedgerClient.noisy`)."""
        call = _calls.create_release(
            dataset_id,
            mechanism=mechanism,
            sensitivity=sensitivity,
            epsilon=epsilon,
            delta=delta,
            noise_scale=None,
            values=values,
            name=name,
            dry_run=False,
            idempotency_key=idempotency_key,
        )
        return noised_values(Release.from_json(await self._json(call)))

    async def noisy_batch(
        self,
        dataset_id: str,
        batch: Sequence[Sequence[float]],
        *,
        mechanism: str,
        sensitivity: float,
        epsilon: float,
        delta: float | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> list[list[float]]:
        """Charge and noise one release per vector (see `LedgerClient.noisy_batch`)."""
        call = _calls.create_release(
            dataset_id,
            mechanism=mechanism,
            sensitivity=sensitivity,
            epsilon=epsilon,
            delta=delta,
            noise_scale=None,
            values=None,
            name=name,
            dry_run=False,
            idempotency_key=idempotency_key,
            batch=batch,
        )
        return noised_batch(Release.from_json(await self._json(call)))

    async def private_argmax(
        self,
        dataset_id: str,
        votes: Sequence[Sequence[int]],
        *,
        teachers: int,
        epsilon: float | None = None,
        delta: float | None = None,
        noise_scale: float | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> list[int]:
        """The noisy argmax label of each vote histogram (see `LedgerClient.private_argmax`)."""
        call = _calls.private_argmax(
            dataset_id,
            votes,
            teachers=teachers,
            epsilon=epsilon,
            delta=delta,
            noise_scale=noise_scale,
            name=name,
            idempotency_key=idempotency_key,
        )
        return labels(Release.from_json(await self._json(call)), len(votes))

    # Ledger -------------------------------------------------------------------------------

    async def ledger(
        self,
        dataset_id: str,
        *,
        kind: str | None = None,
        run_id: str | None = None,
        after: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> AsyncIterator[LedgerEntry]:
        """Every ledger entry of a dataset in `seq` order (after `after`), page by page."""
        pages = _calls.list_ledger(
            dataset_id, kind=kind, run_id=run_id, limit=page_size, after=after
        )
        async for item in self._paginate(pages):
            yield LedgerEntry.from_json(item)

    async def ledger_csv(
        self, dataset_id: str, *, kind: str | None = None, run_id: str | None = None
    ) -> str:
        """The dataset's ledger (every matching entry) as CSV text."""
        return (await self._send(_calls.ledger_csv(dataset_id, kind=kind, run_id=run_id))).text

    async def ledger_export(
        self, dataset_id: str, *, kind: str | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        """The dataset's ledger (every matching entry) as one JSON document, as the service sent it.

        Unlike :meth:`ledger` it is one request, so the entries are one consistent snapshot.
        """
        document = await self._json(_calls.ledger_export(dataset_id, kind=kind, run_id=run_id))
        if not isinstance(document, dict):
            raise LedgerError(
                "unexpected response: a ledger export is not a JSON object",
                code="unexpected_response",
            )
        return document

    async def verify(self, dataset_id: str) -> VerifyResult:
        """Have the service recheck the ledger's hash chain and replay its entries."""
        return VerifyResult.from_json(await self._json(_calls.verify_ledger(dataset_id)))

    async def void_entry(
        self, dataset_id: str, seq: int, *, reason: str, idempotency_key: str | None = None
    ) -> LedgerEntry:
        """Void a charge by a compensating entry (admin)."""
        call = _calls.void_entry(dataset_id, seq, reason=reason, idempotency_key=idempotency_key)
        return LedgerEntry.from_json(await self._json(call))

    # Keys ---------------------------------------------------------------------------------

    async def create_key(
        self,
        role: str,
        *,
        datasets: Sequence[str] | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> ApiKey:
        """Issue an API key (admin); its secret is in ``.key``, shown this once."""
        call = _calls.create_key(
            role, datasets=datasets, name=name, idempotency_key=idempotency_key
        )
        return ApiKey.from_json(await self._json(call))

    async def keys(self, *, page_size: int = 100) -> AsyncIterator[ApiKey]:
        """Every API key's record (never its secret), page by page: all keys for an admin or an
        unscoped auditor; for a scoped auditor those that may act on its datasets."""
        async for item in self._paginate(_calls.list_keys(limit=page_size)):
            yield ApiKey.from_json(item)

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke an API key (admin)."""
        return ApiKey.from_json(await self._json(_calls.revoke_key(key_id)))

    # Accountant ---------------------------------------------------------------------------

    async def epsilon(
        self, *, sample_rate: float, noise_multiplier: float, steps: int, delta: float
    ) -> EpsilonEstimate:
        """ε at `delta` of `steps` Poisson-subsampled Gaussian steps."""
        call = _calls.epsilon(
            sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps, delta=delta
        )
        return EpsilonEstimate.from_json(await self._json(call))

    async def noise_multiplier(
        self, *, sample_rate: float, steps: int, target_epsilon: float, delta: float
    ) -> NoiseCalibration:
        """The smallest σ whose `steps` subsampled Gaussian steps are (target_epsilon, δ)-DP."""
        call = _calls.noise_multiplier(
            sample_rate=sample_rate, steps=steps, target_epsilon=target_epsilon, delta=delta
        )
        return NoiseCalibration.from_json(await self._json(call))


class AsyncRun(RunBase[AsyncLedgerClient]):
    """The async twin of `Run`: ``async with run:`` and ``async for epoch in run:``.

    Endings are recorded as for `Run`, with one difference: Python closes an
    abandoned async generator (``break`` or an exception without
    ``async with``) only later, from the event loop, so without ``async with``
    the abort then happens at some later point, best effort. Use
    ``async with run:``.
    """

    async def reserve_epoch(self, *, idempotency_key: str | None = None) -> Epoch:
        """Charge the next epoch and get its σ (raises on refusal, unlike the loop)."""
        with self._over_if_not_active():
            epoch = await self._client._reserve_epoch(
                self.id, dry_run=False, idempotency_key=idempotency_key
            )
        return self._reserved(epoch)

    async def preview_epoch(self) -> Epoch:
        """A dry run of :meth:`reserve_epoch`."""
        return await self._client._reserve_epoch(self.id, dry_run=True, idempotency_key=None)

    async def complete(self, *, idempotency_key: str | None = None) -> RunRecord:
        """Mark the run completed and release the unspent hold."""
        return await self._finish("complete", idempotency_key)

    async def abort(self, *, idempotency_key: str | None = None) -> RunRecord:
        """Mark the run aborted and release the unspent hold."""
        return await self._finish("abort", idempotency_key)

    async def refresh(self) -> RunRecord:
        """Fetch the run's record again."""
        record = RunRecord.from_json(await self._client._json(_calls.get_run(self.id)))
        return self._refreshed(record)

    async def _finish(self, how: str, idempotency_key: str | None) -> RunRecord:
        with self._over_if_not_active():
            record = await self._client._finish_run(self.id, how, idempotency_key)
        return self._ended(record)

    async def _stop(self, refusal: LedgerError) -> None:
        """End the loop on a refused epoch: remember why and release the hold."""
        if self._refused(refusal):
            with contextlib.suppress(RunNotActive):  # already over (expired): nothing to release
                await self.abort()

    async def _abort_quietly(self) -> None:
        """Abort while the async generator is being closed (best effort)."""
        if not self._may_abort_on_close():
            return
        try:
            await self.abort()
        except RunNotActive:
            pass
        except Exception as exc:  # the event loop may be shutting down around us
            self._warn_abort_failed(exc)

    def __aiter__(self) -> AsyncIterator[Epoch]:
        return self.iterate()

    async def iterate(self, epochs: int | None = None) -> AsyncIterator[Epoch]:
        """Reserve and yield epochs until `epochs` in total are charged (default: the plan)."""
        total = self._start_iterating(epochs)
        try:
            while self.epochs_charged < total:
                try:
                    epoch = await self.reserve_epoch()
                except EPOCH_REFUSALS as refusal:
                    await self._stop(refusal)
                    return
                yield epoch
            if not self._finished:
                await self.complete()
        except GeneratorExit:
            if not self._in_context:
                await self._abort_quietly()
            raise
        finally:
            self._iterating = False

    async def __aenter__(self) -> AsyncRun:
        self._in_context = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._leave_context():
            return
        if exc is None:
            await self.complete()
            return
        with self._abort_failure_noted_on(exc):
            await self.abort()
