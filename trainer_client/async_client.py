"""The asynchronous twin: `AsyncLedgerClient` and `AsyncRun`, the sync surface with `await`.

Everything that decides what to send, when to retry and what an answer means
is shared with the sync client (`trainer_client._http`, `trainer_client._calls`);
see `LedgerClient` and `Run` for the full story of each method.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

import httpx

from trainer_client import _calls, _http
from trainer_client._http import Call, RetryPolicy
from trainer_client.client import (
    DEFAULT_PAGE_SIZE,
    EPOCH_REFUSALS,
    _noised_values,
    default_headers,
    resolve_api_key,
)
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


class AsyncLedgerClient:
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
        self.base_url = base_url
        self.retry_policy = RetryPolicy(max_retries=max_retries, backoff=backoff)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=default_headers(resolve_api_key(api_key)),
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"AsyncLedgerClient({self.base_url!r})"

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

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._http.is_closed

    async def _send(self, call: Call) -> httpx.Response:
        """Send `call`, retrying per the retry policy; raise the mapped error on failure."""
        request = _http.build_request(self._http, call)
        policy = self.retry_policy
        retry = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                if retry < policy.max_retries and _http.should_retry_exception(call.method, exc):
                    wait = policy.delay(retry)
                    _http.log_retry(request, type(exc).__name__, retry, wait)
                    await _http.async_sleep(wait)
                    retry += 1
                    continue
                raise _http.transport_failure(request, exc, retry + 1) from exc
            if retry < policy.max_retries and _http.should_retry_status(
                call.method, response.status_code
            ):
                wait = policy.delay(retry, _http.retry_after_seconds(response))
                _http.log_retry(request, str(response.status_code), retry, wait)
                await response.aclose()
                await _http.async_sleep(wait)
                retry += 1
                continue
            _http.raise_for_status(response, retry + 1)
            return response

    async def _json(self, call: Call) -> Any:
        return _http.json_of(await self._send(call))

    async def _paginate(
        self, call_for: Callable[[Any], Call], cursor_key: str
    ) -> AsyncIterator[Any]:
        after: Any = None
        while True:
            items, has_more = _http.page(await self._json(call_for(after)))
            for item in items:
                yield item
            if not has_more or not items:
                return
            after = items[-1][cursor_key]

    # Datasets -----------------------------------------------------------------------------

    async def dataset(self, dataset_id: str) -> Dataset:
        """The dataset's budget as it stands now."""
        return Dataset.from_json(await self._json(_calls.get_dataset(dataset_id)))

    async def datasets(self, *, page_size: int = 100) -> AsyncIterator[Dataset]:
        """Every dataset this key may see, fetching pages as the iteration goes."""
        async for item in self._paginate(
            lambda after: _calls.list_datasets(limit=page_size, after=after), "id"
        ):
            yield Dataset.from_json(item)

    async def create_dataset(
        self,
        dataset_id: str,
        *,
        epsilon_cap: float,
        delta: float,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> Dataset:
        """Create a dataset with its budget (admin)."""
        call = _calls.create_dataset(
            dataset_id,
            epsilon_cap=epsilon_cap,
            delta=delta,
            description=description,
            idempotency_key=idempotency_key,
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
        async for item in self._paginate(
            lambda after: _calls.list_runs(dataset_id, status=status, limit=page_size, after=after),
            "id",
        ):
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
        return _noised_values(Release.from_json(await self._json(call)))

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

        def call_for(cursor: Any) -> Call:
            start = after if cursor is None else cursor
            return _calls.list_ledger(
                dataset_id, kind=kind, run_id=run_id, limit=page_size, after=start
            )

        async for item in self._paginate(call_for, "seq"):
            yield LedgerEntry.from_json(item)

    async def ledger_csv(
        self, dataset_id: str, *, kind: str | None = None, run_id: str | None = None
    ) -> str:
        """The dataset's ledger (every matching entry) as CSV text."""
        return (await self._send(_calls.ledger_csv(dataset_id, kind=kind, run_id=run_id))).text

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
        """Every API key's record (admin), page by page."""
        async for item in self._paginate(
            lambda after: _calls.list_keys(limit=page_size, after=after), "id"
        ):
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
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=steps,
            delta=delta,
            idempotency_key=None,
        )
        return EpsilonEstimate.from_json(await self._json(call))

    async def noise_multiplier(
        self, *, sample_rate: float, steps: int, target_epsilon: float, delta: float
    ) -> NoiseCalibration:
        """The smallest σ whose `steps` subsampled Gaussian steps are (target_epsilon, δ)-DP."""
        call = _calls.noise_multiplier(
            sample_rate=sample_rate,
            steps=steps,
            target_epsilon=target_epsilon,
            delta=delta,
            idempotency_key=None,
        )
        return NoiseCalibration.from_json(await self._json(call))


class AsyncRun:
    """The async twin of `Run`: ``async with run:`` and ``async for epoch in run:``.

    Endings are recorded as for `Run`, with one difference: Python closes an
    abandoned async generator (``break`` or an exception without
    ``async with``) only later, from the event loop, so without ``async with``
    the abort then happens at some later point, best effort. Use
    ``async with run:``.
    """

    def __init__(self, client: AsyncLedgerClient, record: RunRecord) -> None:
        if record.id is None:
            raise ValueError("a run needs a run id (a dry run's record has none)")
        self._client = client
        self._id: str = record.id
        self.record = record
        self.last_epoch: Epoch | None = None
        self.stopped_reason: LedgerError | None = None
        self._finished = record.status != "active"
        self._in_context = False
        self._iterating = False

    def __repr__(self) -> str:
        return (
            f"AsyncRun(id={self.id!r}, dataset_id={self.dataset_id!r}, status={self.status!r}, "
            f"epochs_charged={self.epochs_charged}/{self.epochs})"
        )

    @property
    def id(self) -> str:
        """The run's id."""
        return self._id

    @property
    def dataset_id(self) -> str:
        """The dataset the run is charged to."""
        return self.record.dataset_id

    @property
    def noise_multiplier(self) -> float:
        """σ for every step of every planned epoch."""
        return self.record.noise_multiplier

    @property
    def epsilon(self) -> float:
        """The whole plan's own ε at the dataset's δ."""
        return self.record.epsilon

    @property
    def sample_rate(self) -> float:
        """The Poisson sampling rate q the plan is accounted for."""
        return self.record.sample_rate

    @property
    def steps_per_epoch(self) -> int:
        """Steps per epoch in the plan."""
        return self.record.steps_per_epoch

    @property
    def epochs(self) -> int:
        """Planned epochs (what iterating the run goes through)."""
        return self.record.epochs

    @property
    def max_grad_norm(self) -> float | None:
        """The clipping norm the run declared, if any."""
        return self.record.max_grad_norm

    @property
    def sampling(self) -> str:
        """``"poisson"`` or ``"shuffle"``."""
        return self.record.sampling

    @property
    def status(self) -> str:
        """The run's status as last seen."""
        return self.record.status

    @property
    def epochs_charged(self) -> int:
        """Epochs charged so far (as last seen)."""
        if self.last_epoch is not None and not self.last_epoch.dry_run:
            return max(self.last_epoch.index, self.record.epochs_charged)
        return self.record.epochs_charged

    @property
    def finished(self) -> bool:
        """Whether the run is known to be over."""
        return self._finished

    async def reserve_epoch(self, *, idempotency_key: str | None = None) -> Epoch:
        """Charge the next epoch and get its σ (raises on refusal, unlike the loop)."""
        try:
            epoch = await self._client._reserve_epoch(
                self.id, dry_run=False, idempotency_key=idempotency_key
            )
        except RunNotActive:
            self._finished = True
            raise
        self.last_epoch = epoch
        return epoch

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
        self.record = RunRecord.from_json(await self._client._json(_calls.get_run(self.id)))
        self._finished = self.record.status != "active"
        return self.record

    async def _finish(self, how: str, idempotency_key: str | None) -> RunRecord:
        try:
            self.record = await self._client._finish_run(self.id, how, idempotency_key)
        except RunNotActive:
            self._finished = True
            raise
        self._finished = True
        return self.record

    async def _stop(self, refusal: LedgerError) -> None:
        self.stopped_reason = refusal
        if self._finished:
            return
        with contextlib.suppress(RunNotActive):  # already over (expired): nothing to release
            await self.abort()

    async def _abort_quietly(self) -> None:
        if self._finished or self._client.closed:
            return
        try:
            await self.abort()
        except RunNotActive:
            pass
        except Exception as exc:  # the event loop may be shutting down around us
            warnings.warn(
                f"could not abort run {self.id} ({exc}); its hold is released when its lease "
                "expires",
                RuntimeWarning,
                stacklevel=2,
            )

    def __aiter__(self) -> AsyncIterator[Epoch]:
        return self.iterate()

    async def iterate(self, epochs: int | None = None) -> AsyncIterator[Epoch]:
        """Reserve and yield epochs until `epochs` in total are charged (default: the plan)."""
        total = self.epochs if epochs is None else epochs
        if self._iterating:
            raise RuntimeError(f"run {self.id} is already being iterated")
        self._iterating = True
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
        self._in_context = False
        if self._finished:
            return
        if exc is None:
            await self.complete()
            return
        try:
            await self.abort()
        except RunNotActive:
            pass
        except LedgerError as abort_error:
            exc.add_note(f"trainer_client: aborting run {self.id} failed too: {abort_error}")
