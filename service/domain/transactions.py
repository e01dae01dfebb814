"""One admission = one transaction, with its idempotency record in the same commit.

`write` locks the dataset (when the operation has one), replays or refuses a
reused Idempotency-Key, runs the operation, stores the rendered response under
the key and commits — all or nothing. A unique-key race (two first requests
with the same key on different rows, or two creations of one id) surfaces as
an IntegrityError at commit; the operation is then retried once, and the retry
finds the winner's record or row.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import metrics
from service.domain.errors import (
    BudgetExhausted,
    Conflict,
    DatasetFrozen,
    DomainError,
    IdempotencyConflict,
    NotFound,
    RunNotActive,
)
from service.storage.database import Database
from service.storage.models import Dataset, IdempotencyRecord, utcnow

Body = dict[str, Any]

# Marks a keyed fingerprint; a stored fingerprint without it is a legacy unkeyed SHA-256 (hex).
HMAC_PREFIX = "hmac-sha256:"


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
class Outcome:
    """What to answer: a status and a JSON body, and whether it is a replay."""

    status: int
    body: Body
    replayed: bool = False


Operation = Callable[[Session, Dataset | None], tuple[int, Body]]


def write(
    db: Database,
    operation: Operation,
    *,
    dataset_id: str | None = None,
    run_id: str | None = None,
    idempotency: Idempotency | None = None,
    admission: str | None = None,
) -> Outcome:
    """Run `operation` in one write transaction, honouring `idempotency`.

    The operation gets the dataset locked by `dataset_id`, or the dataset of
    `run_id` (NotFound if there is none), or None if neither is given.
    `admission` names the decision for the metrics (plan, epoch, release).
    """
    for attempt in (1, 2):
        try:
            started = time.perf_counter()
            with db.write() as session:
                dataset = None
                if dataset_id is not None or run_id is not None:
                    dataset = _lock(db, session, dataset_id, run_id)
                    metrics.LOCK_WAIT.observe(time.perf_counter() - started)
                if idempotency is not None:
                    replay = _replay(session, idempotency)
                    if replay is not None:
                        metrics.REPLAYS.inc()
                        return replay
                status, body = _counted(admission, operation, session, dataset)
                if idempotency is not None:
                    session.add(
                        IdempotencyRecord(
                            holder=idempotency.holder,
                            key=idempotency.key,
                            request_hash=idempotency.request_hash,
                            status_code=status,
                            response_body=json.dumps(body, separators=(",", ":")),
                            created_at=utcnow(),
                        )
                    )
            return Outcome(status, body)
        except IntegrityError:
            if attempt == 2:
                raise Conflict("the request conflicts with a concurrent one; retry it") from None
    raise AssertionError("unreachable")


def _counted(
    admission: str | None, operation: Operation, session: Session, dataset: Dataset | None
) -> tuple[int, Body]:
    if admission is None:
        return operation(session, dataset)
    try:
        result = operation(session, dataset)
    except (BudgetExhausted, DatasetFrozen, RunNotActive) as refusal:
        metrics.admission(admission, refusal.code)
        raise
    metrics.admission(admission, "admitted")
    return result


def _lock(db: Database, session: Session, dataset_id: str | None, run_id: str | None) -> Dataset:
    dataset = db.lock_dataset(session, dataset_id, run_id=run_id)
    if dataset is None:
        raise NotFound(
            f"run {run_id!r} not found" if run_id else f"dataset {dataset_id!r} not found"
        )
    return dataset


def rehearse(
    db: Database, operation: Operation, *, dataset_id: str | None = None, run_id: str | None = None
) -> tuple[Body | None, DomainError | None]:
    """Run `operation` as a dry run: (its body, None) if admitted, (None, refusal) if not.

    The operation runs exactly as for real, under the same lock, and is then
    rolled back, so the verdict is the one the real call would get now.
    """
    with db.rehearsal() as session:
        dataset = _lock(db, session, dataset_id, run_id)
        try:
            return operation(session, dataset)[1], None
        except (BudgetExhausted, DatasetFrozen, RunNotActive) as refusal:
            return None, refusal


def _replay(session: Session, idempotency: Idempotency) -> Outcome | None:
    record = session.get(IdempotencyRecord, (idempotency.holder, idempotency.key))
    if record is None:
        return None
    if not idempotency.matches(record.request_hash):
        raise IdempotencyConflict(
            "this Idempotency-Key was already used for a different request",
            idempotency_key=idempotency.key,
        )
    return Outcome(record.status_code, json.loads(record.response_body), replayed=True)
