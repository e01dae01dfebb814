"""The admission pipeline: every write transaction of the domain runs here.

An operation is an `Admission`: a typed `decide(session, dataset)` that returns a typed
result or raises a typed refusal (`service.domain.errors`), with what to lock (a dataset,
or the dataset of a run) and the request's Idempotency-Key. The pipeline owns the
transaction around it: lock the dataset, replay or refuse a reused key, decide, store the
idempotency record, commit. No answer leaves before its commit.

Combined commits (flat combining, group commit). Admissions that arrive together in one
process queue on its lane; the first to find the lane idle leads: it takes every queued
admission (up to `max_batch`), locks their datasets in one statement (in id order, so two
batches never deadlock), takes the admissions that queued while it waited for those locks
(on PostgreSQL those of the datasets it now holds; on SQLite, whose write lock holds the whole
database, every one), decides them one after another in arrival order — each against
the state the previous ones of its dataset left — stores each one's entry and idempotency
record, and commits them together. Then it hands the lane to the next queued admission,
which leads the next batch. One batch spans datasets: with many datasets and a few
trainers each, batches per dataset would stay small, while the round trips and the commit
are what a batch shares. Across worker processes and replicas the datasets' row locks
(`SELECT … FOR UPDATE`; SQLite's write lock) still serialise the batches, so nothing may
overspend; each admission still reads and writes its own dataset's rows only.

One admission's refusal or bad input never fails another: every `decide` checks before it
changes anything, so a refusal leaves the batch's state as it found it (the tests plant
refusals among admitted requests). An unexpected error in one decision, or a unique-key
race with another process (refused by the database), rolls the whole batch back before
anything is written; the failing admission gets its error and the others are decided again,
each in a transaction of its own. A commit that fails is never decided again — it may have
landed, and a request without a key would be charged twice — so each of its admissions
answers the error, and clients retry with their keys.

Threads and coroutines. `submit` blocks its thread until its admission is decided (the CLI,
the benchmarks' seeding, the routes that are plain `def`s); `submit_async` awaits it on the
caller's event loop (the budget admissions' routes). Both queue on the one lane and share
batches. A thread's ticket that comes first leads the next batch in its own thread; a
coroutine's ticket that comes first has it led by the pipeline's leader thread (one per
pipeline), and the batch's end wakes each loop's coroutines with one call. So a served
process decides its batches on that one thread while its event loop reads and answers
requests, rather than parking a thread-pool thread per waiting request.

Idempotency records store what the HTTP layer made of the first result (`Record`, given
when the pipeline is built; the CLI's has none and takes no keys): the domain keeps them
opaque and hands them back as `Replayed`. Two requests with one key in one batch: the
second is the first's replay (or an `IdempotencyConflict` if its request differs), as if
they had come one after another.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, bindparam, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import metrics
from service.domain.errors import REFUSALS, Conflict, DomainError, IdempotencyConflict, NotFound
from service.storage.database import Database, stage_row
from service.storage.models import Dataset, IdempotencyRecord, Run, utcnow

R = TypeVar("R")

# Marks a keyed fingerprint; a stored fingerprint without it is a legacy unkeyed SHA-256 (hex).
HMAC_PREFIX = "hmac-sha256:"
# Admissions decided in one transaction at most: a bound on how long the last one waits.
MAX_BATCH = 64
# Runs whose dataset is remembered (a run never changes dataset): a lookup saved per epoch.
_RUN_CACHE = 65_536


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key as presented by one API key, with the request's fingerprints.

    `request_hash` (keyed, HMAC_PREFIX) is what is stored; `legacy_hash` (the unkeyed SHA-256
    of the same request) is only compared with records written before fingerprints were keyed.
    """

    holder: str
    key: str
    request_hash: str
    legacy_hash: str

    def matches(self, stored: str) -> bool:
        """Whether a stored fingerprint is this request's (keyed or legacy)."""
        mine = self.request_hash if stored.startswith(HMAC_PREFIX) else self.legacy_hash
        return hmac.compare_digest(stored.encode(), mine.encode())


@dataclass(frozen=True)
class Replayed:
    """The first answer to an Idempotency-Key, as the HTTP layer recorded it (opaque here)."""

    status: int
    body: str


# What the HTTP layer records of a result for replays: (status, JSON text).
Record = Callable[[object], tuple[int, str]]


@dataclass(frozen=True)
class Admission(Generic[R]):
    """One write: what to lock, the key it may replay, and the decision itself.

    `decide` gets the locked dataset (None when neither `dataset_id` nor `run_id` is given)
    and returns the typed result or raises a DomainError; it must raise before it changes
    anything. `operation` names it for the metrics (plan, epoch, release), if it is one of
    the budget admissions. `refine`, if given, turns its refusal into the one to raise, once
    the lock is released (work too slow to do under it).
    """

    decide: Callable[[Session, Dataset | None], R]
    dataset_id: str | None = None
    run_id: str | None = None
    idempotency: Idempotency | None = None
    operation: str | None = None
    refine: Callable[[DomainError], DomainError] | None = None


@dataclass(eq=False)  # tickets are compared by identity
class _Ticket(Generic[R]):
    admission: Admission[R]
    dataset_id: str
    queued_at: float = field(default_factory=time.perf_counter)
    ready: threading.Event = field(default_factory=threading.Event)
    leads: bool = False
    result: R | Replayed | None = None
    error: BaseException | None = None
    done: bool = False
    # Put back once because another process held its dataset: its next batch waits for the lock.
    deferred: bool = False
    taken_at: float = 0.0  # when a batch took it
    # A coroutine's ticket (`submit_async`): resolved on its future's event loop; batches led
    # for it run on the pipeline's leader thread. None for a thread's ticket (`submit`), woken
    # by `ready`.
    future: asyncio.Future[None] | None = None

    def outcome(self) -> R | Replayed:
        if self.error is not None:
            raise self.error
        assert self.done
        return self.result  # type: ignore[return-value]


@dataclass
class _Lane:
    waiting: list[_Ticket[object]] = field(default_factory=list)
    busy: bool = False


class Pipeline:
    """The one place write transactions happen (see the module's docstring)."""

    def __init__(
        self, db: Database, record: Record | None = None, *, max_batch: int = MAX_BATCH
    ) -> None:
        self.db = db
        self.record = record
        self.max_batch = max_batch
        self._mutex = threading.Lock()
        self._lane = _Lane()
        self._run_datasets: dict[str, str] = {}
        # Leads the batches of coroutines' tickets (one at a time, as the lane's are).
        self._leader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-leader")

    # -- entry points -------------------------------------------------------------------------

    def submit(self, admission: Admission[R]) -> R | Replayed:
        """Decide and commit `admission` (combined with others that arrive with it); its result,
        or the first answer to its Idempotency-Key; raises its refusal (refined, if asked)."""
        with _refined(admission):
            return self._submit(admission)

    async def submit_async(self, admission: Admission[R]) -> R | Replayed:
        """`submit` for a coroutine: it waits on its event loop, not in a thread.

        Its ticket queues on the same lane; a batch it leads runs on the pipeline's leader
        thread, and the batch's end resolves every coroutine's ticket with one call to its
        loop. Lookups and refinements that may touch the database run in the loop's default
        executor.
        """
        try:
            if admission.run_id is not None and admission.dataset_id is None:
                dataset_id = self._run_datasets.get(admission.run_id)
                if dataset_id is None:
                    dataset_id = await asyncio.to_thread(self.dataset_of_run, admission.run_id)
            else:
                dataset_id = admission.dataset_id
            if dataset_id is None:
                return await asyncio.to_thread(self._alone, admission)
            future = asyncio.get_running_loop().create_future()
            ticket: _Ticket[R] = _Ticket(admission, dataset_id, future=future)
            lane = self._lane
            with self._mutex:
                lane.waiting.append(ticket)  # type: ignore[arg-type]
                leads = not lane.busy
                lane.busy = True
            if leads:
                self._leader.submit(self._lead, lane)
            await future  # a caller cancelled meanwhile leaves its ticket to be decided
            return ticket.outcome()
        except DomainError as refusal:
            if admission.refine is None:
                raise
            raise await asyncio.to_thread(admission.refine, refusal) from None

    def _submit(self, admission: Admission[R]) -> R | Replayed:
        dataset_id = self._dataset_of(admission)
        if dataset_id is None:
            return self._alone(admission)
        ticket: _Ticket[R] = _Ticket(admission, dataset_id)
        lane = self._lane
        with self._mutex:
            lane.waiting.append(ticket)  # type: ignore[arg-type]
            ticket.leads = not lane.busy
            lane.busy = True
        while True:
            if not ticket.leads:
                ticket.ready.wait()  # set once the ticket is done, or when it is to lead
            with self._mutex:
                if ticket.done:
                    return ticket.outcome()
                ticket.leads = False
                ticket.ready.clear()
            # This thread leads the next batch, which begins with its own ticket; if that one is
            # put back (its dataset locked by another process), the loop waits for it again.
            self._lead(lane)

    def rehearse(self, admission: Admission[R]) -> R:
        """Decide `admission` as a dry run: under the same lock, then rolled back.

        The verdict is the one the real call would get now; its refusal is raised.
        """
        with _refined(admission), self.db.rehearsal() as session:
            dataset = self._lock(session, admission)
            return admission.decide(session, dataset)

    def dataset_of_run(self, run_id: str) -> str:
        """The dataset a run belongs to (NotFound if there is no such run); remembered."""
        known = self._run_datasets.get(run_id)
        if known is not None:
            return known
        with self.db.lookup() as session:
            found = session.execute(
                select(Run.dataset_id).where(Run.id == run_id)
            ).scalar_one_or_none()
        if found is None:
            raise NotFound(f"run {run_id!r} not found")
        self.remember_run(run_id, found)
        return found

    def remember_run(self, run_id: str, dataset_id: str) -> None:
        """Note a run's dataset (a plan notes its new run: its epochs need no lookup)."""
        with self._mutex:
            if len(self._run_datasets) >= _RUN_CACHE:
                self._run_datasets.clear()
            self._run_datasets[run_id] = dataset_id

    # -- combining ----------------------------------------------------------------------------

    def _lead(self, lane: _Lane) -> None:
        with self._mutex:
            batch = lane.waiting[: self.max_batch]
            del lane.waiting[: self.max_batch]
        started = time.perf_counter()
        for ticket in batch:
            ticket.taken_at = started
        deferred: list[_Ticket[object]] = []
        try:
            # `batch` grows by the tickets that join once the locks are held (`_join`).
            deferred = self._combined(lane, batch)
        except IntegrityError:
            # A unique-key race with another process (two first uses of one Idempotency-Key),
            # refused by the database, so nothing was written: each decided again alone, where
            # the retry finds the winner's record.
            self._one_by_one(batch)
        except _Undecided as failed:
            # A decision failed before the commit, so nothing was written: the failure stays
            # with its admission, the others are decided again.
            _fail(failed.ticket, failed.error)
            self._one_by_one([t for t in batch if t is not failed.ticket])
        except BaseException as exc:
            # The commit itself failed (or its flush): it may even have landed, so nothing is
            # decided again (a request without a key would be charged twice); each answers the
            # error (503 for a database failure) and clients retry with their keys.
            for ticket in batch:
                _fail(ticket, exc)
        finally:
            finished = [t for t in batch if t not in deferred]
            if finished:  # not a batch whose datasets were all held elsewhere: it decided none
                metrics.BATCH_SIZE.observe(len(finished))
            for ticket in finished:
                metrics.BATCH_WAIT.observe(ticket.taken_at - ticket.queued_at)
            drain = False
            with self._mutex:
                for ticket in finished:
                    ticket.done = True
                for ticket in deferred:
                    ticket.deferred = True
                lane.waiting[:0] = deferred  # first in line again, in their order
                if not lane.waiting:
                    lane.busy = False
                elif lane.waiting[0].future is None:  # a thread waits for it: that thread leads
                    successor = lane.waiting[0]
                    successor.leads = True
                    successor.ready.set()
                else:  # a coroutine's: the leader thread leads, once this batch has returned
                    drain = True
            if drain:
                self._leader.submit(self._lead, lane)
            _wake(finished)

    def _one_by_one(self, batch: list[_Ticket[object]]) -> None:
        for ticket in batch:
            ticket.result, ticket.error = None, None
            try:
                ticket.result = self._alone(ticket.admission)
            except Exception as exc:
                _fail(ticket, exc)

    def _combined(self, lane: _Lane, batch: list[_Ticket[object]]) -> list[_Ticket[object]]:
        """Decide every ticket under its dataset's lock and commit them together; the tickets
        put back for the next batch (their datasets locked by another process just now).
        Tickets that queued while the locks were awaited join the batch (`_join`): `batch`
        is extended in place, so the caller answers them too."""
        started = time.perf_counter()
        tally: list[tuple[str | None, str]] = []
        # A batch first takes the datasets nobody else holds (SKIP LOCKED): two processes then
        # decide disjoint datasets side by side rather than one after the other. A ticket put
        # back once waits for its lock in the next batch, so none is put back forever.
        skip_held = not self.db.is_sqlite and not any(t.deferred for t in batch)
        with self.db.write() as session:
            wanted = sorted({t.dataset_id for t in batch})
            locked = self.db.lock_datasets(session, wanted, skip_locked=skip_held)
            metrics.LOCK_WAIT.observe(time.perf_counter() - started)
            deferred = [t for t in batch if skip_held and t.dataset_id not in locked]
            self._join(lane, batch, session, locked)
            decided = [t for t in batch if t not in deferred] if deferred else batch
            if not decided:
                return deferred
            records = _stored_records(session, [t.admission for t in decided])
            run_ids = [t.admission.run_id for t in decided if t.admission.run_id is not None]
            if run_ids:  # one statement loads every run the batch touches
                statement = select(Run).where(Run.id.in_(sorted(set(run_ids))))
                # Held for the transaction: the identity map only keeps rows referenced.
                session.info["batch_runs"] = session.execute(statement).scalars().all()
            for ticket in decided:
                ticket.result, ticket.error = None, None
                dataset = locked.get(ticket.dataset_id)
                try:
                    if dataset is None:
                        raise _missing(ticket.admission)
                    ticket.result = self._decide(session, dataset, ticket.admission, records, tally)
                except DomainError as refusal:
                    ticket.error = refusal
                except Exception as exc:
                    raise _Undecided(ticket, exc) from exc
        _count(tally)
        return deferred

    def _join(
        self,
        lane: _Lane,
        batch: list[_Ticket[object]],
        session: Session,
        locked: dict[str, Dataset],
    ) -> None:
        """Add to `batch` the tickets that queued while its locks were awaited: on PostgreSQL
        those whose datasets it holds, on SQLite (the whole database is held) every one, their
        datasets read now. Taken once the locks are held, they are decided in this turn of the
        lock rather than the next: with two processes on one dataset a batch taken before the
        wait held only the requests answered two turns earlier."""
        room = self.max_batch - len(batch)
        if room <= 0:
            return
        now = time.perf_counter()
        with self._mutex:
            if self.db.is_sqlite:
                late = lane.waiting[:room]
                del lane.waiting[:room]
            else:
                late = [t for t in lane.waiting if t.dataset_id in locked][:room]
                if late:
                    taken = set(late)  # tickets hash by identity
                    lane.waiting[:] = [t for t in lane.waiting if t not in taken]
        if not late:
            return
        for ticket in late:
            ticket.taken_at = now
        batch.extend(late)
        missing = sorted({t.dataset_id for t in late} - locked.keys())
        if missing:  # SQLite only: rows read under the database's write lock
            locked.update(self.db.lock_datasets(session, missing))

    # -- one admission ------------------------------------------------------------------------

    def _alone(self, admission: Admission[R]) -> R | Replayed:
        """One admission in its own transaction, retried once after a unique-key race."""
        for attempt in (1, 2):
            tally: list[tuple[str | None, str]] = []
            try:
                with self.db.write() as session:
                    started = time.perf_counter()
                    dataset = self._lock(session, admission)
                    if dataset is not None:
                        metrics.LOCK_WAIT.observe(time.perf_counter() - started)
                    records = _stored_records(session, [admission])
                    try:
                        result = self._decide(session, dataset, admission, records, tally)
                    except DomainError:
                        _count(tally)
                        raise
                _count(tally)
                return result
            except IntegrityError:
                if attempt == 2:
                    raise Conflict(
                        "the request conflicts with a concurrent one; retry it"
                    ) from None
        raise AssertionError("unreachable")

    def _decide(
        self,
        session: Session,
        dataset: Dataset | None,
        admission: Admission[R],
        records: dict[tuple[str, str], tuple[str, int, str]],
        tally: list[tuple[str | None, str]],
    ) -> R | Replayed:
        """One admission inside a write transaction; `tally` gets what to count once it ends."""
        keyed = admission.idempotency
        if keyed is not None:
            prior = records.get((keyed.holder, keyed.key))
            if prior is not None:
                fingerprint, status, body = prior
                if not keyed.matches(fingerprint):
                    raise IdempotencyConflict(
                        "this Idempotency-Key was already used for a different request",
                        idempotency_key=keyed.key,
                    )
                tally.append((None, "replayed"))
                return Replayed(status, body)
        try:
            result = admission.decide(session, dataset)
        except REFUSALS as refusal:
            tally.append((admission.operation, refusal.code))
            raise
        tally.append((admission.operation, "admitted"))
        if keyed is not None:
            if self.record is None:
                raise TypeError("this pipeline records no answers: it takes no Idempotency-Key")
            status, body = self.record(result)
            record = {
                "holder": keyed.holder,
                "key": keyed.key,
                "request_hash": keyed.request_hash,
                "status_code": status,
                "response_body": body,
                "created_at": utcnow(),
            }
            stage_row(session, IdempotencyRecord, record)
            records[(keyed.holder, keyed.key)] = (keyed.request_hash, status, body)
        return result

    def _dataset_of(self, admission: Admission[R]) -> str | None:
        """The dataset an admission locks: its own, or its run's; None for neither."""
        if admission.run_id is not None and admission.dataset_id is None:
            return self.dataset_of_run(admission.run_id)
        return admission.dataset_id

    def _lock(self, session: Session, admission: Admission[R]) -> Dataset | None:
        dataset_id = self._dataset_of(admission)
        if dataset_id is None:
            return None
        dataset = self.db.lock_dataset(session, dataset_id)
        if dataset is None:
            raise _missing(admission)
        return dataset


class _Undecided(Exception):
    """An admission's decision failed unexpectedly (before its batch's commit)."""

    def __init__(self, ticket: _Ticket[object], error: Exception) -> None:
        super().__init__(str(error))
        self.ticket, self.error = ticket, error


@contextmanager
def _refined(admission: Admission[Any]) -> Iterator[None]:
    """Raise a refusal from the block as the admission refines it (`Admission.refine`)."""
    try:
        yield
    except DomainError as refusal:
        if admission.refine is None:
            raise
        raise admission.refine(refusal) from None


def _wake(tickets: list[_Ticket[object]]) -> None:
    """Wake the owners of finished tickets: threads at once, coroutines with one call per loop."""
    loops: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for ticket in tickets:
        if ticket.future is None:
            ticket.ready.set()
        else:
            loops.setdefault(ticket.future.get_loop(), []).append(ticket.future)
    for loop, futures in loops.items():
        with suppress(RuntimeError):  # a closed loop: nobody awaits these any more
            loop.call_soon_threadsafe(_resolve, futures)


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def _count(tally: list[tuple[str | None, str]]) -> None:
    """Count a transaction's decisions once it has ended (a batch decided again counts once)."""
    for operation, outcome in tally:
        if outcome == "replayed":
            metrics.REPLAYS.inc()
        elif operation is not None:
            metrics.admission(operation, outcome)


def _missing(admission: Admission[R]) -> NotFound:
    if admission.run_id is not None and admission.dataset_id is None:
        return NotFound(f"run {admission.run_id!r} not found")
    return NotFound(f"dataset {admission.dataset_id!r} not found")


def _fail(ticket: _Ticket[R], error: BaseException) -> None:
    ticket.result, ticket.error = None, error


def _stored_records(
    session: Session, admissions: Sequence[Admission[Any]]
) -> dict[tuple[str, str], tuple[str, int, str]]:
    """The stored records of every Idempotency-Key of `admissions`, in one statement."""
    wanted = {
        (a.idempotency.holder, a.idempotency.key) for a in admissions if a.idempotency is not None
    }
    if not wanted:
        return {}
    parameters: dict[str, str] = {}
    for index, (holder, key) in enumerate(sorted(wanted)):
        parameters[f"holder_{index}"], parameters[f"key_{index}"] = holder, key
    rows = session.execute(_records_statement(len(wanted)), parameters)
    return {(r.holder, r.key): (r.request_hash, r.status_code, r.response_body) for r in rows}


@lru_cache(maxsize=MAX_BATCH)
def _records_statement(count: int) -> Select[str, str, str, int, str]:
    """The lookup of `count` keys' records, built once per count (building it costs more than
    running it): one primary-key match per key, OR'ed. SQLite scans the whole table for a
    row-value IN list (`(holder, key) IN (VALUES …)`), but searches the index for each of these."""
    record = IdempotencyRecord
    matches = (
        and_(record.holder == bindparam(f"holder_{i}"), record.key == bindparam(f"key_{i}"))
        for i in range(count)
    )
    columns = (record.holder, record.key, record.request_hash, record.status_code)
    return select(*columns, record.response_body).where(or_(*matches))
