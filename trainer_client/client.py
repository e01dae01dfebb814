"""The synchronous client: `LedgerClient` and the `Run` handle a DP-SGD loop iterates."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import httpx

from trainer_client import _calls, _http
from trainer_client._http import Call, RetryPolicy
from trainer_client.errors import (
    BudgetExhausted,
    DatasetFrozen,
    LedgerError,
    RunNotActive,
)
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

__all__ = ["EPOCH_REFUSALS", "LedgerClient", "Run"]

#: The answers to an epoch reservation that end a run's loop cleanly (not as an error).
EPOCH_REFUSALS: tuple[type[LedgerError], ...] = (BudgetExhausted, RunNotActive, DatasetFrozen)

DEFAULT_PAGE_SIZE = 500


def resolve_api_key(api_key: str | None) -> str:
    """`api_key`, or the LEDGER_API_KEY environment variable."""
    key = api_key if api_key is not None else os.environ.get("LEDGER_API_KEY")
    if not key:
        raise ValueError("an API key is required: pass api_key= or set LEDGER_API_KEY")
    return key


def default_headers(api_key: str) -> dict[str, str]:
    """Headers sent with every request."""
    return {"Authorization": f"Bearer {api_key}", "User-Agent": _http.USER_AGENT}


class LedgerClient:
    """A connection to the privacy ledger (docs/api.md), for trainers, auditors and admins.

    Use it as a context manager (``with LedgerClient(url, key) as client:``)
    or call :meth:`close`. Every POST carries an Idempotency-Key (a fresh
    UUID unless you pass ``idempotency_key=``) that stays the same across that
    call's retries; failures without an answer and 5xx answers are retried
    `max_retries` times with exponential backoff (base `backoff` seconds) and
    full jitter; 4xx answers are raised at once as a `LedgerError` subclass.
    `transport` replaces httpx's network transport (tests use
    ``httpx.MockTransport``). `api_key` defaults to ``$LEDGER_API_KEY``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.retry_policy = RetryPolicy(max_retries=max_retries, backoff=backoff)
        self._http = httpx.Client(
            base_url=base_url,
            headers=default_headers(resolve_api_key(api_key)),
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"LedgerClient({self.base_url!r})"

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying connections."""
        self._http.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._http.is_closed

    # The one place requests are sent ------------------------------------------------------

    def _send(self, call: Call) -> httpx.Response:
        """Send `call`, retrying per the retry policy; raise the mapped error on failure."""
        request = _http.build_request(self._http, call)
        policy = self.retry_policy
        retry = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                if retry < policy.max_retries and _http.should_retry_exception(call.method, exc):
                    wait = policy.delay(retry)
                    _http.log_retry(request, type(exc).__name__, retry, wait)
                    _http.sleep(wait)
                    retry += 1
                    continue
                raise _http.transport_failure(request, exc, retry + 1) from exc
            if retry < policy.max_retries and _http.should_retry_status(
                call.method, response.status_code
            ):
                wait = policy.delay(retry, _http.retry_after_seconds(response))
                _http.log_retry(request, str(response.status_code), retry, wait)
                response.close()
                _http.sleep(wait)
                retry += 1
                continue
            _http.raise_for_status(response, retry + 1)
            return response

    def _json(self, call: Call) -> Any:
        return _http.json_of(self._send(call))

    def _paginate(self, call_for: Callable[[Any], Call], cursor_key: str) -> Iterator[Any]:
        after: Any = None
        while True:
            items, has_more = _http.page(self._json(call_for(after)))
            yield from items
            if not has_more or not items:
                return
            after = items[-1][cursor_key]

    # Datasets -----------------------------------------------------------------------------

    def dataset(self, dataset_id: str) -> Dataset:
        """The dataset's budget as it stands now."""
        return Dataset.from_json(self._json(_calls.get_dataset(dataset_id)))

    def datasets(self, *, page_size: int = 100) -> Iterator[Dataset]:
        """Every dataset this key may see, fetching pages as the iteration goes."""
        for item in self._paginate(
            lambda after: _calls.list_datasets(limit=page_size, after=after), "id"
        ):
            yield Dataset.from_json(item)

    def create_dataset(
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
        return Dataset.from_json(self._json(call))

    def update_dataset(
        self,
        dataset_id: str,
        *,
        epsilon_cap: float | None = None,
        frozen: bool | None = None,
        description: str | None = None,
        reason: str | None = None,
    ) -> Dataset:
        """Change a dataset's cap, frozen flag or description (admin); each is a ledger entry."""
        call = _calls.update_dataset(
            dataset_id,
            epsilon_cap=epsilon_cap,
            frozen=frozen,
            description=description,
            reason=reason,
        )
        return Dataset.from_json(self._json(call))

    # Runs ---------------------------------------------------------------------------------

    def start_run(
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
    ) -> Run:
        """Plan a DP-SGD run: the ledger holds the whole plan's budget and fixes σ.

        Give exactly one of `target_epsilon` (the ledger calibrates the
        smallest σ whose plan is (target_epsilon, δ)-DP) or
        `noise_multiplier`. Raises `BudgetExhausted` when the plan does not
        fit the dataset's cap. Iterate the returned `Run` to train.
        """
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
        return Run(self, RunRecord.from_json(self._json(call)))

    def preview_run(
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
        """A dry run of :meth:`start_run`: the σ and ε it would get; nothing is held.

        Raises what :meth:`start_run` would raise (e.g. `BudgetExhausted`) if
        the plan would be refused.
        """
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
        return RunRecord.from_json(self._json(call))

    def run(self, run_id: str) -> Run:
        """A handle on an existing run (e.g. to continue it after a restart)."""
        return Run(self, RunRecord.from_json(self._json(_calls.get_run(run_id))))

    def runs(
        self, dataset_id: str, *, status: str | None = None, page_size: int = 100
    ) -> Iterator[RunRecord]:
        """Every run of a dataset (optionally only those with `status`), page by page."""
        for item in self._paginate(
            lambda after: _calls.list_runs(dataset_id, status=status, limit=page_size, after=after),
            "id",
        ):
            yield RunRecord.from_json(item)

    def _reserve_epoch(self, run_id: str, *, dry_run: bool, idempotency_key: str | None) -> Epoch:
        call = _calls.reserve_epoch(run_id, dry_run=dry_run, idempotency_key=idempotency_key)
        return Epoch.from_json(self._json(call))

    def _finish_run(self, run_id: str, how: str, idempotency_key: str | None) -> RunRecord:
        call = _calls.finish_run(run_id, how, idempotency_key=idempotency_key)
        return RunRecord.from_json(self._json(call))

    # Releases -----------------------------------------------------------------------------

    def release(
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
        """Charge one noisy release and get the noise scale to add yourself.

        `mechanism` is ``"gaussian"``, ``"laplace"`` or ``"pure_dp"``; give
        exactly one of `epsilon` (Gaussian also needs `delta`) or
        `noise_scale`. With ``dry_run=True`` nothing is charged: you get the
        release that would be made (``id`` None) or the exception the real call
        would raise.
        """
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
        return Release.from_json(self._json(call))

    def noisy(
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
        """Charge one release and have the service add the noise to `values`; the noised values.

        `sensitivity` is the L2 (Gaussian) or L1 (Laplace) sensitivity of the
        whole vector `values` under adding or removing one record.
        """
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
        return _noised_values(Release.from_json(self._json(call)))

    # Ledger -------------------------------------------------------------------------------

    def ledger(
        self,
        dataset_id: str,
        *,
        kind: str | None = None,
        run_id: str | None = None,
        after: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[LedgerEntry]:
        """Every ledger entry of a dataset in `seq` order (after `after`), page by page."""

        def call_for(cursor: Any) -> Call:
            start = after if cursor is None else cursor
            return _calls.list_ledger(
                dataset_id, kind=kind, run_id=run_id, limit=page_size, after=start
            )

        for item in self._paginate(call_for, "seq"):
            yield LedgerEntry.from_json(item)

    def ledger_csv(
        self, dataset_id: str, *, kind: str | None = None, run_id: str | None = None
    ) -> str:
        """The dataset's ledger (every matching entry) as CSV text."""
        return self._send(_calls.ledger_csv(dataset_id, kind=kind, run_id=run_id)).text

    def verify(self, dataset_id: str) -> VerifyResult:
        """Have the service recheck the ledger's hash chain and replay its entries."""
        return VerifyResult.from_json(self._json(_calls.verify_ledger(dataset_id)))

    def void_entry(
        self, dataset_id: str, seq: int, *, reason: str, idempotency_key: str | None = None
    ) -> LedgerEntry:
        """Void a charge by a compensating entry (admin); nothing is ever deleted."""
        call = _calls.void_entry(dataset_id, seq, reason=reason, idempotency_key=idempotency_key)
        return LedgerEntry.from_json(self._json(call))

    # Keys ---------------------------------------------------------------------------------

    def create_key(
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
        return ApiKey.from_json(self._json(call))

    def keys(self, *, page_size: int = 100) -> Iterator[ApiKey]:
        """Every API key's record (admin), page by page."""
        for item in self._paginate(
            lambda after: _calls.list_keys(limit=page_size, after=after), "id"
        ):
            yield ApiKey.from_json(item)

    def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke an API key (admin)."""
        return ApiKey.from_json(self._json(_calls.revoke_key(key_id)))

    # Accountant ---------------------------------------------------------------------------

    def epsilon(
        self, *, sample_rate: float, noise_multiplier: float, steps: int, delta: float
    ) -> EpsilonEstimate:
        """ε at `delta` of `steps` Poisson-subsampled Gaussian steps (the ledger's accountant)."""
        call = _calls.epsilon(
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=steps,
            delta=delta,
            idempotency_key=None,
        )
        return EpsilonEstimate.from_json(self._json(call))

    def noise_multiplier(
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
        return NoiseCalibration.from_json(self._json(call))


def _noised_values(release: Release) -> list[float]:
    if release.noised_values is None:
        raise LedgerError(
            "unexpected response: a release with values came back without noised_values",
            code="unexpected_response",
        )
    return list(release.noised_values)


class Run:
    """A live DP-SGD run: iterate it to reserve each epoch just before training it.

    ::

        with client.start_run("mnist", sample_rate=q, steps_per_epoch=k, epochs=10,
                              target_epsilon=3.0, max_grad_norm=1.0) as run:
            for epoch in run:            # POST /epochs right before each epoch
                train_one_epoch(sigma=epoch.noise_multiplier, ...)
        print(run.status, run.stopped_reason)

    How the loop ends:

    * all planned epochs done → the run is **completed**;
    * the ledger refuses an epoch (`BudgetExhausted`, `RunNotActive`,
      `DatasetFrozen`) → the loop stops *without raising*, the refusal is in
      `stopped_reason`, and the run is aborted so its hold is released;
    * an exception in the loop body → the run is **aborted** and the
      exception propagates;
    * ``break`` inside ``with run:`` → the run is **completed** when the
      ``with`` block exits (an exception leaving the block aborts it instead).
      Without ``with``, a generator cannot tell ``break`` from an exception
      (Python closes it the same way in both cases), so it fails safe and
      **aborts**. Use ``with`` (or call :meth:`complete`) when stopping early
      is a success.

    Every ending releases the unspent part of the hold; epochs already handed
    out stay charged (the ledger cannot know whether you used them).
    """

    def __init__(self, client: LedgerClient, record: RunRecord) -> None:
        if record.id is None:
            raise ValueError("a Run needs a run id (a dry run's record has none)")
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
            f"Run(id={self.id!r}, dataset_id={self.dataset_id!r}, status={self.status!r}, "
            f"epochs_charged={self.epochs_charged}/{self.epochs})"
        )

    # The plan, as the ledger fixed it ------------------------------------------------------

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
        """The run's status as last seen: active, completed, aborted or expired."""
        return self.record.status

    @property
    def epochs_charged(self) -> int:
        """Epochs charged so far (as last seen)."""
        if self.last_epoch is not None and not self.last_epoch.dry_run:
            return max(self.last_epoch.index, self.record.epochs_charged)
        return self.record.epochs_charged

    @property
    def finished(self) -> bool:
        """Whether the run is known to be over (completed, aborted, expired)."""
        return self._finished

    # Manual control --------------------------------------------------------------------------

    def reserve_epoch(self, *, idempotency_key: str | None = None) -> Epoch:
        """Charge the next epoch and get its σ (raises on refusal, unlike the loop).

        Beyond the planned epochs this is charged only if the dataset's filter
        admits it (else `BudgetExhausted`).
        """
        try:
            epoch = self._client._reserve_epoch(
                self.id, dry_run=False, idempotency_key=idempotency_key
            )
        except RunNotActive:
            self._finished = True
            raise
        self.last_epoch = epoch
        return epoch

    def preview_epoch(self) -> Epoch:
        """A dry run of :meth:`reserve_epoch`: the epoch it would charge, or its refusal."""
        return self._client._reserve_epoch(self.id, dry_run=True, idempotency_key=None)

    def complete(self, *, idempotency_key: str | None = None) -> RunRecord:
        """Mark the run completed and release the unspent hold."""
        return self._finish("complete", idempotency_key)

    def abort(self, *, idempotency_key: str | None = None) -> RunRecord:
        """Mark the run aborted and release the unspent hold."""
        return self._finish("abort", idempotency_key)

    def refresh(self) -> RunRecord:
        """Fetch the run's record again."""
        self.record = RunRecord.from_json(self._client._json(_calls.get_run(self.id)))
        self._finished = self.record.status != "active"
        return self.record

    def _finish(self, how: str, idempotency_key: str | None) -> RunRecord:
        try:
            self.record = self._client._finish_run(self.id, how, idempotency_key)
        except RunNotActive:
            self._finished = True
            raise
        self._finished = True
        return self.record

    def _stop(self, refusal: LedgerError) -> None:
        """End the loop on a refused epoch: remember why and release the hold."""
        self.stopped_reason = refusal
        if self._finished:
            return
        with contextlib.suppress(RunNotActive):  # already over (expired): nothing to release
            self.abort()

    def _abort_quietly(self) -> None:
        """Abort while a generator is being closed, where raising would be swallowed anyway."""
        if self._finished or self._client.closed:
            return
        try:
            self.abort()
        except RunNotActive:
            pass
        except Exception as exc:  # raising here would only print "Exception ignored in"
            warnings.warn(
                f"could not abort run {self.id} ({exc}); its hold is released when its lease "
                "expires",
                RuntimeWarning,
                stacklevel=2,
            )

    # The loop ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Epoch]:
        return self.iterate()

    def iterate(self, epochs: int | None = None) -> Iterator[Epoch]:
        """Reserve and yield epochs until `epochs` in total are charged (default: the plan).

        Asking for more than the plan goes on beyond it while the dataset's
        filter admits; the first refusal ends the loop cleanly (see the class
        docstring for how each ending is recorded).
        """
        total = self.epochs if epochs is None else epochs
        if self._iterating:
            raise RuntimeError(f"run {self.id} is already being iterated")
        self._iterating = True
        try:
            while self.epochs_charged < total:
                try:
                    epoch = self.reserve_epoch()
                except EPOCH_REFUSALS as refusal:
                    self._stop(refusal)
                    return
                yield epoch
            if not self._finished:
                self.complete()
        except GeneratorExit:
            # `break`, an exception in the loop body, or the generator dropped: Python
            # gives no way to tell which. Inside `with run:` the block's exit decides;
            # otherwise fail safe.
            if not self._in_context:
                self._abort_quietly()
            raise
        finally:
            self._iterating = False

    def __enter__(self) -> Run:
        self._in_context = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._in_context = False
        if self._finished:
            return
        if exc is None:
            self.complete()
            return
        try:
            self.abort()
        except RunNotActive:
            pass
        except LedgerError as abort_error:
            exc.add_note(f"trainer_client: aborting run {self.id} failed too: {abort_error}")
