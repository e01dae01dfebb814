"""What the sync and async classes share beyond the wire: their state and every non-I/O step.

`LedgerClient`/`AsyncLedgerClient` and `Run`/`AsyncRun` differ only where they
send a request or wait for one; their state, properties and bookkeeping live
here once, so the twins cannot drift apart. (What to send, whether to retry and
what an answer means live in `trainer_client._calls` and `trainer_client._http`.)
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import httpx

from trainer_client import _http
from trainer_client._http import RetryPolicy
from trainer_client.errors import BudgetExhausted, DatasetFrozen, LedgerError, RunNotActive
from trainer_client.models import Epoch, Release, RunRecord

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


def noised_values(release: Release) -> list[float]:
    """The values the service noised, from the answer to a release that sent values."""
    if release.noised_values is None:
        raise LedgerError(
            "unexpected response: a release with values came back without noised_values",
            code="unexpected_response",
        )
    return list(release.noised_values)


def noised_batch(release: Release) -> list[list[float]]:
    """The vectors the service noised, from the answer to a release that sent a batch."""
    if release.noised_batch is None:
        raise LedgerError(
            "unexpected response: a batch release came back without noised_batch",
            code="unexpected_response",
        )
    return [list(vector) for vector in release.noised_batch]


def labels(release: Release, queries: int) -> list[int]:
    """The labels of a noisy-argmax answer: one per histogram sent, or a clear error."""
    if release.labels is None or len(release.labels) != queries:
        raise LedgerError(
            f"unexpected response: {queries} noisy_argmax queries came back with labels "
            f"{release.labels!r}",
            code="unexpected_response",
        )
    return list(release.labels)


HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)


class ClientBase(Generic[HttpT]):
    """The state of a client: where the ledger is, how to retry, and its httpx client."""

    _http: HttpT  # set by the subclass, which knows whether it is sync or async

    def __init__(self, base_url: str, *, max_retries: int, backoff: float) -> None:
        self.base_url = base_url
        self.retry_policy = RetryPolicy(max_retries=max_retries, backoff=backoff)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    @property
    def closed(self) -> bool:
        """Whether the client was closed (:meth:`close`, or ``aclose`` for the async one)."""
        return self._http.is_closed


ClientT = TypeVar("ClientT", bound=ClientBase[Any])


class RunBase(Generic[ClientT]):
    """A run's state as last seen, the plan's read-only properties, and the loop's bookkeeping.

    The subclasses add only what talks to the ledger (reserving, completing,
    aborting, refreshing, the loop itself).
    """

    def __init__(self, client: ClientT, record: RunRecord) -> None:
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
            f"{type(self).__name__}(id={self.id!r}, dataset_id={self.dataset_id!r}, "
            f"status={self.status!r}, epochs_charged={self.epochs_charged}/{self.epochs})"
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

    # Bookkeeping around the calls the subclasses make ----------------------------------------

    @contextlib.contextmanager
    def _over_if_not_active(self) -> Iterator[None]:
        """Let `RunNotActive` through, having noted that the run is over."""
        try:
            yield
        except RunNotActive:
            self._finished = True
            raise

    def _reserved(self, epoch: Epoch) -> Epoch:
        self.last_epoch = epoch
        return epoch

    def _refreshed(self, record: RunRecord) -> RunRecord:
        self.record = record
        self._finished = record.status != "active"
        return record

    def _ended(self, record: RunRecord) -> RunRecord:
        self.record = record
        self._finished = True
        return record

    def _refused(self, refusal: LedgerError) -> bool:
        """Remember why the loop stopped; whether the hold still needs releasing (an abort)."""
        self.stopped_reason = refusal
        return not self._finished

    def _may_abort_on_close(self) -> bool:
        """Whether closing the loop's generator should still try to abort the run."""
        return not (self._finished or self._client.closed)

    def _warn_abort_failed(self, exc: Exception) -> None:
        # stacklevel 3: past this helper and `_abort_quietly`, to the loop that was closed.
        warnings.warn(
            f"could not abort run {self.id} ({exc}); its hold is released when its lease expires",
            RuntimeWarning,
            stacklevel=3,
        )

    def _start_iterating(self, epochs: int | None) -> int:
        """The total the loop runs to; refuses a second loop over the same run at once."""
        total = self.epochs if epochs is None else epochs
        if self._iterating:
            raise RuntimeError(f"run {self.id} is already being iterated")
        self._iterating = True
        return total

    def _leave_context(self) -> bool:
        """Note that the ``with`` block is over; whether the run still has to be ended."""
        self._in_context = False
        return not self._finished

    @contextlib.contextmanager
    def _abort_failure_noted_on(self, exc: BaseException) -> Iterator[None]:
        """Around the abort that ends a failed ``with`` block: the block's exception wins.

        An abort refused because the run is already over is fine; any other
        ledger error is added as a note to the exception leaving the block.
        """
        try:
            yield
        except RunNotActive:
            pass
        except LedgerError as abort_error:
            exc.add_note(f"trainer_client: aborting run {self.id} failed too: {abort_error}")
