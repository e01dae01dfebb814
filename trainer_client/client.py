"""The synchronous client: `LedgerClient` and the `Run` handle a DP-SGD loop iterates."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
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

# DEFAULT_PAGE_SIZE, resolve_api_key and default_headers stay importable from here.
__all__ = ["EPOCH_REFUSALS", "LedgerClient", "Run"]


class LedgerClient(ClientBase[httpx.Client]):
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
        super().__init__(base_url, max_retries=max_retries, backoff=backoff)
        self._http = httpx.Client(
            base_url=base_url,
            headers=default_headers(resolve_api_key(api_key)),
            timeout=timeout,
            transport=transport,
        )

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

    # The one place requests are sent ------------------------------------------------------

    def _send(self, call: Call) -> httpx.Response:
        """Send `call`, retrying per the retry policy; raise the mapped error on failure."""
        request = _http.build_request(self._http, call)
        retry = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                wait = _http.retry_wait(self.retry_policy, request, retry, exc)
                if wait is None:
                    raise _http.transport_failure(request, exc, retry + 1) from exc
            else:
                wait = _http.retry_wait(self.retry_policy, request, retry, response)
                if wait is None:
                    _http.raise_for_status(response, retry + 1)
                    return response
                response.close()
            _http.sleep(wait)
            retry += 1

    def _json(self, call: Call) -> Any:
        return _http.json_of(self._send(call))

    def _paginate(self, pages: Pages) -> Iterator[Any]:
        after: Any = None
        while True:
            items, has_more = _http.page(self._json(pages.call_after(after)))
            yield from items
            if not has_more or not items:
                return
            after = items[-1][pages.cursor_key]

    # Datasets -----------------------------------------------------------------------------

    def dataset(self, dataset_id: str) -> Dataset:
        """The dataset's budget as it stands now."""
        return Dataset.from_json(self._json(_calls.get_dataset(dataset_id)))

    def datasets(self, *, page_size: int = 100) -> Iterator[Dataset]:
        """Every dataset this key may see, fetching pages as the iteration goes."""
        for item in self._paginate(_calls.list_datasets(limit=page_size)):
            yield Dataset.from_json(item)

    def create_dataset(
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
        for item in self._paginate(_calls.list_runs(dataset_id, status=status, limit=page_size)):
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
        count: int = 1,
        dry_run: bool = False,
        idempotency_key: str | None = None,
    ) -> Release:
        """Charge one noisy release and get the noise scale to add yourself.

        `mechanism` is ``"gaussian"``, ``"laplace"`` or ``"pure_dp"``; give
        exactly one of `epsilon` (Gaussian also needs `delta`) or
        `noise_scale`. With `count` K, one charge covers K such releases (one
        ledger entry, exactly K times the cost of one; all or nothing). With
        ``dry_run=True`` nothing is charged: you get the release that would be
        made (``id`` None) or the exception the real call would raise.
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
            count=count,
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
        return noised_values(Release.from_json(self._json(call)))

    def noisy_batch(
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
        """Charge one release per vector of `batch` (one ledger entry, K times one release's cost)
        and have the service noise each; the noised vectors, in order."""
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
        return noised_batch(Release.from_json(self._json(call)))

    def private_argmax(
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
        """Private prediction (GNMax): the noisy argmax label of each vote histogram.

        ``votes[k][c]`` is how many of the `teachers` (each trained on its own
        disjoint part of the dataset) predict class ``c`` for query ``k``. The
        service adds exact discrete Gaussian noise to every count — std
        `noise_scale`, or calibrated to (`epsilon`, `delta`) per query — and
        answers only the labels (ties to the smallest). The K queries are one
        admission and one ledger entry costing exactly K single queries; if they
        do not fit, none is answered (``BudgetExhausted``).
        """
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
        return labels(Release.from_json(self._json(call)), len(votes))

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
        pages = _calls.list_ledger(
            dataset_id, kind=kind, run_id=run_id, limit=page_size, after=after
        )
        for item in self._paginate(pages):
            yield LedgerEntry.from_json(item)

    def ledger_csv(
        self, dataset_id: str, *, kind: str | None = None, run_id: str | None = None
    ) -> str:
        """The dataset's ledger (every matching entry) as CSV text."""
        return self._send(_calls.ledger_csv(dataset_id, kind=kind, run_id=run_id)).text

    def ledger_export(
        self, dataset_id: str, *, kind: str | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        """The dataset's ledger (every matching entry) as one JSON document, as the service sent it.

        Unlike :meth:`ledger` it is one request, so the entries are one consistent snapshot.
        """
        document = self._json(_calls.ledger_export(dataset_id, kind=kind, run_id=run_id))
        if not isinstance(document, dict):
            raise LedgerError(
                "unexpected response: a ledger export is not a JSON object",
                code="unexpected_response",
            )
        return document

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
        """Every API key's record (never its secret), page by page: all keys for an admin or an
        unscoped auditor; for a scoped auditor those that may act on its datasets."""
        for item in self._paginate(_calls.list_keys(limit=page_size)):
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
            sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps, delta=delta
        )
        return EpsilonEstimate.from_json(self._json(call))

    def noise_multiplier(
        self, *, sample_rate: float, steps: int, target_epsilon: float, delta: float
    ) -> NoiseCalibration:
        """The smallest σ whose `steps` subsampled Gaussian steps are (target_epsilon, δ)-DP."""
        call = _calls.noise_multiplier(
            sample_rate=sample_rate, steps=steps, target_epsilon=target_epsilon, delta=delta
        )
        return NoiseCalibration.from_json(self._json(call))


class Run(RunBase[LedgerClient]):
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

    # Manual control --------------------------------------------------------------------------

    def reserve_epoch(self, *, idempotency_key: str | None = None) -> Epoch:
        """Charge the next epoch and get its σ (raises on refusal, unlike the loop).

        Beyond the planned epochs this is charged only if the dataset's filter
        admits it (else `BudgetExhausted`).
        """
        with self._over_if_not_active():
            epoch = self._client._reserve_epoch(
                self.id, dry_run=False, idempotency_key=idempotency_key
            )
        return self._reserved(epoch)

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
        return self._refreshed(RunRecord.from_json(self._client._json(_calls.get_run(self.id))))

    def _finish(self, how: str, idempotency_key: str | None) -> RunRecord:
        with self._over_if_not_active():
            record = self._client._finish_run(self.id, how, idempotency_key)
        return self._ended(record)

    def _stop(self, refusal: LedgerError) -> None:
        """End the loop on a refused epoch: remember why and release the hold."""
        if self._refused(refusal):
            with contextlib.suppress(RunNotActive):  # already over (expired): nothing to release
                self.abort()

    def _abort_quietly(self) -> None:
        """Abort while a generator is being closed, where raising would be swallowed anyway."""
        if not self._may_abort_on_close():
            return
        try:
            self.abort()
        except RunNotActive:
            pass
        except Exception as exc:  # raising here would only print "Exception ignored in"
            self._warn_abort_failed(exc)

    # The loop ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Epoch]:
        return self.iterate()

    def iterate(self, epochs: int | None = None) -> Iterator[Epoch]:
        """Reserve and yield epochs until `epochs` in total are charged (default: the plan).

        Asking for more than the plan goes on beyond it while the dataset's
        filter admits; the first refusal ends the loop cleanly (see the class
        docstring for how each ending is recorded).
        """
        total = self._start_iterating(epochs)
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
        if not self._leave_context():
            return
        if exc is None:
            self.complete()
            return
        with self._abort_failure_noted_on(exc):
            self.abort()
