"""The append-only, hash-chained ledger: appending, reading, verifying, replaying.

Each entry's hash is SHA-256 over `prev_hash` and a canonical JSON encoding of
every other field (sorted keys, no whitespace, floats by repr, which
round-trips exactly). Replaying the entries in order — hold: pending += units;
charge: posted += units (and pending -= units when it came from a hold);
release_hold: pending -= units; void: posted -= units; correction: posted +=
units; hold_top_up: pending += units — must reproduce the
dataset row's cached curves exactly (integer units, so there is no rounding).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from accountant import exact
from accountant.mechanisms import Mechanism
from service.domain.budget import Budget, dumps_units, loads_units
from service.storage.models import Dataset, LedgerEntry, Run

GENESIS_HASH = "0" * 64
_VERIFY_BATCH = 2000


def iso(moment: datetime) -> str:
    """A timestamp as stored in entries: ISO 8601 UTC with microseconds and a Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(payload: dict[str, Any]) -> str:
    """The canonical JSON text an entry's hash covers."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _hashed_fields(entry: LedgerEntry) -> dict[str, Any]:
    fields = {
        "dataset_id": entry.dataset_id,
        "seq": entry.seq,
        "kind": entry.kind,
        "run_id": entry.run_id,
        "release_id": entry.release_id,
        "voids_seq": entry.voids_seq,
        "mechanism": json.loads(entry.mechanism) if entry.mechanism else None,
        "units": loads_units(entry.units) if entry.units else None,
        "actor": entry.actor,
        "idempotency_key": entry.idempotency_key,
        "epsilon": entry.epsilon,
        "epsilon_spent_after": entry.epsilon_spent_after,
        "epsilon_reserved_after": entry.epsilon_reserved_after,
        "details": json.loads(entry.details),
        "created_at": entry.created_at,
    }
    # Who, by name and role (migration 0005): hashed only for entries that carry it, so every
    # older entry's hash still verifies; a new entry always has a role, so removing the pair
    # from it changes its hash. An unnamed key hashes as "actor_name": null.
    if entry.actor_role is not None:
        fields["actor_name"] = entry.actor_name
        fields["actor_role"] = entry.actor_role
    return fields


def entry_hash(entry: LedgerEntry) -> str:
    """SHA-256 over the previous hash and the entry's canonical encoding."""
    digest = hashlib.sha256()
    digest.update(entry.prev_hash.encode("ascii"))
    digest.update(canonical(_hashed_fields(entry)).encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class Actor:
    """Who writes an entry: a key id, with the key's name and role as they are at write time."""

    id: str
    name: str | None
    role: str


@dataclass
class Append:
    """What a domain operation wants written as one entry."""

    kind: str
    actor: Actor
    mechanism: Mechanism | None = None
    units: list[int] | None = None
    run_id: str | None = None
    release_id: str | None = None
    voids_seq: int | None = None
    idempotency_key: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def append(
    session: Session, dataset: Dataset, budget: Budget, request: Append, now: datetime
) -> LedgerEntry:
    """Append one entry to a locked dataset whose budget already reflects it; store the curves."""
    budget.store(dataset)
    entry = LedgerEntry(
        dataset_id=dataset.id,
        seq=dataset.last_seq + 1,
        kind=request.kind,
        run_id=request.run_id,
        release_id=request.release_id,
        voids_seq=request.voids_seq,
        mechanism=canonical(request.mechanism.params()) if request.mechanism else None,
        units=dumps_units(request.units) if request.units is not None else None,
        actor=request.actor.id,
        actor_name=request.actor.name,
        actor_role=request.actor.role,
        idempotency_key=request.idempotency_key,
        epsilon=budget.own_epsilon(request.units) if request.units is not None else None,
        epsilon_spent_after=budget.epsilon_spent(),
        epsilon_reserved_after=budget.epsilon_reserved(),
        details=canonical(request.details),
        created_at=iso(now),
        prev_hash=dataset.last_hash,
    )
    entry.hash = entry_hash(entry)
    dataset.last_seq = entry.seq
    dataset.last_hash = entry.hash
    dataset.updated_at = now
    session.add(entry)
    return entry


def apply(budget: Budget, entry: LedgerEntry) -> None:
    """Replay one entry's effect on the curves."""
    if entry.units is None:
        return
    units = loads_units(entry.units)
    if entry.kind == "hold":
        budget.hold(units)
    elif entry.kind == "charge":
        budget.charge(units, from_hold=bool(json.loads(entry.details).get("from_hold")))
    elif entry.kind == "release_hold":
        budget.release(units)
    elif entry.kind == "void":
        budget.void(units)
    elif entry.kind == "correction":
        budget.charge(units, from_hold=False)
    elif entry.kind == "hold_top_up":
        budget.hold(units)


def entries(
    session: Session,
    dataset_id: str,
    *,
    after: int = 0,
    limit: int | None = None,
    kind: str | None = None,
    run_id: str | None = None,
) -> list[LedgerEntry]:
    """Entries of a dataset in seq order, after `after`, optionally filtered."""
    statement = (
        select(LedgerEntry)
        .where(LedgerEntry.dataset_id == dataset_id, LedgerEntry.seq > after)
        .order_by(LedgerEntry.seq)
    )
    if kind is not None:
        statement = statement.where(LedgerEntry.kind == kind)
    if run_id is not None:
        statement = statement.where(LedgerEntry.run_id == run_id)
    if limit is not None:
        statement = statement.limit(limit)
    return list(session.execute(statement).scalars())


def stream(session: Session, dataset_id: str, **filters: Any) -> Iterator[LedgerEntry]:
    """Every matching entry, fetched in batches (for exports and verification)."""
    after = 0
    while True:
        batch = entries(session, dataset_id, after=after, limit=_VERIFY_BATCH, **filters)
        yield from batch
        if len(batch) < _VERIFY_BATCH:
            return
        after = batch[-1].seq


@dataclass
class Verification:
    """The outcome of recomputing a dataset's chain and replaying its curves."""

    ok: bool
    entries: int
    last_seq: int
    last_hash: str
    chain_ok: bool
    replay_ok: bool
    problems: list[str]


def verify(session: Session, dataset: Dataset, *, max_problems: int = 50) -> Verification:
    """Recompute every hash, check seq has no gaps, replay the curves against the cache, and
    check the dataset's cached run count and lapse bound against its runs."""
    problems: list[str] = []
    chain_ok = True
    cached = Budget.of(dataset)
    zero = [0] * len(cached.orders)
    replayed = Budget(filter=cached.filter, orders=cached.orders, posted=zero, pending=list(zero))
    previous_hash, expected_seq, count = GENESIS_HASH, 1, 0

    def problem(text: str) -> None:
        if len(problems) < max_problems:
            problems.append(text)

    for entry in stream(session, dataset.id):
        count += 1
        if entry.seq != expected_seq:
            chain_ok = False
            problem(f"seq {entry.seq}: expected seq {expected_seq} (gap or reordering)")
        if entry.prev_hash != previous_hash:
            chain_ok = False
            problem(f"seq {entry.seq}: prev_hash does not match the previous entry's hash")
        if entry_hash(entry) != entry.hash:
            chain_ok = False
            problem(f"seq {entry.seq}: hash does not match the entry's contents")
        try:
            apply(replayed, entry)
        except (ValueError, json.JSONDecodeError) as exc:
            problem(f"seq {entry.seq}: cannot replay: {exc}")
        previous_hash, expected_seq = entry.hash, entry.seq + 1

    if dataset.last_seq != expected_seq - 1 or dataset.last_hash != previous_hash:
        chain_ok = False
        problem("the dataset's head (last_seq/last_hash) does not match the last entry")
    replay_ok = replayed.posted == cached.posted and replayed.pending == cached.pending
    if not replay_ok:
        problem("replaying the entries does not reproduce the cached posted/pending curves")
    active = (Run.dataset_id == dataset.id, Run.status == "active")
    counted, earliest = session.execute(
        select(func.count(), func.min(Run.expires_at)).where(*active)
    ).one()
    if dataset.active_runs != counted:
        problem(f"the dataset counts {dataset.active_runs} active runs; its runs say {counted}")
    if earliest is not None and (
        dataset.lapse_check_at is None or dataset.lapse_check_at > earliest
    ):
        problem("the dataset's lapse bound is later than an active run's lease end")
    ok = chain_ok and replay_ok and not problems
    return Verification(ok, count, expected_seq - 1, previous_hash, chain_ok, replay_ok, problems)


def zero_units(orders: tuple[float, ...]) -> list[int]:
    """An all-zero curve on a grid."""
    return exact.to_units([0.0] * len(orders))
