"""Datasets: creation, reading (with lazy hold expiry), admin changes, voids, verification."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from accountant import DEFAULT_ORDERS
from accountant.mechanisms import from_params
from service.domain import holds, ledger
from service.domain.budget import Budget, dumps_units, loads_units
from service.domain.errors import CapBelowReserved, Conflict, NotFound
from service.domain.keys import Principal
from service.domain.transactions import Body, Idempotency, Outcome, write
from service.storage.database import Database
from service.storage.models import Dataset, LedgerEntry, utcnow


@dataclass(frozen=True)
class DatasetView:
    """A dataset as callers see it: cap, δ and the composed ε figures."""

    id: str
    description: str
    epsilon_cap: float
    delta: float
    epsilon_spent: float
    epsilon_reserved: float
    epsilon_remaining: float
    frozen: bool
    ledger_seq: int
    active_runs: int
    created_at: datetime
    updated_at: datetime


def view(dataset: Dataset, budget: Budget | None = None) -> DatasetView:
    """The caller-facing view of a dataset row."""
    budget = budget or Budget.of(dataset)
    reserved = budget.epsilon_reserved()
    return DatasetView(
        id=dataset.id,
        description=dataset.description,
        epsilon_cap=dataset.epsilon_cap,
        delta=dataset.delta,
        epsilon_spent=budget.epsilon_spent(),
        epsilon_reserved=reserved,
        epsilon_remaining=max(0.0, dataset.epsilon_cap - reserved),
        frozen=dataset.frozen,
        ledger_seq=dataset.last_seq,
        active_runs=dataset.active_runs,
        created_at=dataset.created_at,
        updated_at=dataset.updated_at,
    )


@dataclass(frozen=True)
class DatasetSpec:
    """What an admin gives to create a dataset."""

    id: str
    epsilon_cap: float
    delta: float
    description: str = ""


@dataclass(frozen=True)
class DatasetPatch:
    """An admin's change to a dataset (None = unchanged)."""

    epsilon_cap: float | None = None
    frozen: bool | None = None
    description: str | None = None
    reason: str | None = None


Render = Callable[[DatasetView], Body]


def create(
    db: Database,
    principal: Principal,
    spec: DatasetSpec,
    render: Render,
    idempotency: Idempotency | None = None,
) -> Outcome:
    """Create a dataset with a zero budget and its `dataset_created` entry."""
    principal.require("admin")

    def operation(session: Session, _: Dataset | None) -> tuple[int, Body]:
        if session.get(Dataset, spec.id) is not None:
            raise Conflict(f"dataset {spec.id!r} already exists")
        now = utcnow()
        orders = tuple(float(a) for a in DEFAULT_ORDERS)
        zero = ledger.zero_units(orders)
        dataset = Dataset(
            id=spec.id,
            description=spec.description,
            epsilon_cap=spec.epsilon_cap,
            delta=spec.delta,
            frozen=False,
            orders=json.dumps(list(orders)),
            posted_units=dumps_units(zero),
            pending_units=dumps_units(zero),
            last_seq=0,
            last_hash=ledger.GENESIS_HASH,
            active_runs=0,
            lapse_check_at=None,
            created_at=now,
            updated_at=now,
        )
        session.add(dataset)
        session.flush()
        budget = Budget.of(dataset)
        details = {
            "epsilon_cap": spec.epsilon_cap,
            "delta": spec.delta,
            "description": spec.description,
            "orders": list(orders),
        }
        ledger.append(
            session,
            dataset,
            budget,
            ledger.Append(
                "dataset_created",
                principal.actor,
                idempotency_key=idempotency.key if idempotency else None,
                details=details,
            ),
            now,
        )
        return 201, render(view(dataset, budget))

    return write(db, operation, idempotency=idempotency)


def refresh(db: Database, dataset_id: str) -> Dataset:
    """The dataset row, its owed corrections appended and lapsed holds expired first if it may
    have any (the lazy expiry on read); NotFound if there is no such dataset."""
    with db.read() as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    if not holds.due(dataset, utcnow()):
        return dataset
    refreshed: list[Dataset] = []

    def operation(session: Session, locked: Dataset | None) -> tuple[int, Body]:
        assert locked is not None
        holds.expire(session, locked, Budget.of(locked), utcnow())
        refreshed.append(locked)
        return 200, {}

    write(db, operation, dataset_id=dataset_id)
    return refreshed[0]


def get(db: Database, principal: Principal, dataset_id: str) -> DatasetView:
    """One dataset (expiring its lapsed holds first)."""
    principal.require("trainer", "auditor")
    principal.require_dataset(dataset_id)
    return view(refresh(db, dataset_id))


def listing(
    db: Database, principal: Principal, *, after: str | None, limit: int
) -> tuple[list[DatasetView], bool]:
    """Datasets visible to the key, in id order after a cursor; and whether more follow."""
    principal.require("trainer", "auditor")
    with db.read() as session:
        lapsed = holds.datasets_due(session, utcnow())
    for dataset_id in lapsed:
        if principal.sees(dataset_id):
            refresh(db, dataset_id)
    with db.read() as session:
        statement = select(Dataset).order_by(Dataset.id).limit(limit + 1)
        if after:
            statement = statement.where(Dataset.id > after)
        if principal.datasets is not None:
            statement = statement.where(Dataset.id.in_(sorted(principal.datasets)))
        rows = list(session.execute(statement).scalars())
        return [view(d) for d in rows[:limit]], len(rows) > limit


def update(
    db: Database,
    principal: Principal,
    dataset_id: str,
    patch: DatasetPatch,
    render: Render,
    idempotency: Idempotency | None = None,
) -> Outcome:
    """Apply an admin's change; every changed field becomes its own ledger entry."""
    principal.require("admin")
    key = idempotency.key if idempotency else None

    def operation(session: Session, dataset: Dataset | None) -> tuple[int, Body]:
        assert dataset is not None
        now = utcnow()
        holds.expire(session, dataset, Budget.of(dataset), now)
        reason = {"reason": patch.reason} if patch.reason else {}
        if patch.epsilon_cap is not None and patch.epsilon_cap != dataset.epsilon_cap:
            old = dataset.epsilon_cap
            if patch.epsilon_cap < old:
                _check_lower_cap(Budget.of(dataset), patch.epsilon_cap, old)
            dataset.epsilon_cap = patch.epsilon_cap
            details = {"old": old, "new": patch.epsilon_cap, **reason}
            entry = ledger.Append(
                "cap_change", principal.actor, idempotency_key=key, details=details
            )
            ledger.append(session, dataset, Budget.of(dataset), entry, now)
        if patch.frozen is not None and patch.frozen != dataset.frozen:
            dataset.frozen = patch.frozen
            kind = "freeze" if patch.frozen else "unfreeze"
            entry = ledger.Append(kind, principal.actor, idempotency_key=key, details=dict(reason))
            ledger.append(session, dataset, Budget.of(dataset), entry, now)
        if patch.description is not None and patch.description != dataset.description:
            details = {"old": dataset.description, "new": patch.description, **reason}
            dataset.description = patch.description
            entry = ledger.Append(
                "description_change", principal.actor, idempotency_key=key, details=details
            )
            ledger.append(session, dataset, Budget.of(dataset), entry, now)
        return 200, render(view(dataset))

    principal.require_dataset(dataset_id)
    return write(db, operation, dataset_id=dataset_id, idempotency=idempotency)


def _check_lower_cap(budget: Budget, epsilon_cap: float, old: float) -> None:
    """Refuse a lower cap whose filter would not admit what is posted and held.

    Held epochs post later without a new admission, so a cap they no longer fit under would
    let the reported ε pass the cap (docs/accounting.md, "Lowering a cap").
    """
    if budget.with_cap(epsilon_cap).admits_reserved():
        return
    spent, reserved = budget.epsilon_spent(), budget.epsilon_reserved()
    raise CapBelowReserved(
        f"a cap of {epsilon_cap:g} is below what the dataset has already spent and held "
        f"(reserved ε={reserved:.6g}, spent ε={spent:.6g}); lower it to at least the reserved "
        "ε, or after the runs that hold budget complete, abort or expire",
        epsilon_cap=old,
        epsilon_cap_requested=epsilon_cap,
        epsilon_spent=spent,
        epsilon_reserved=reserved,
    )


def void(
    db: Database,
    principal: Principal,
    dataset_id: str,
    seq: int,
    reason: str,
    render: Callable[[LedgerEntry], Body],
    idempotency: Idempotency | None = None,
) -> Outcome:
    """Compensate a charge with a `void` entry (nothing is ever updated or deleted)."""
    principal.require("admin")

    def operation(session: Session, dataset: Dataset | None) -> tuple[int, Body]:
        assert dataset is not None
        target = session.get(LedgerEntry, (dataset_id, seq))
        if target is None:
            raise NotFound(f"ledger entry {seq} of dataset {dataset_id!r} not found")
        if target.kind != "charge" or target.units is None or target.mechanism is None:
            raise Conflict(f"entry {seq} is a {target.kind}: only charges can be voided")
        already = session.execute(
            select(LedgerEntry.seq).where(
                LedgerEntry.dataset_id == dataset_id, LedgerEntry.voids_seq == seq
            )
        ).scalar_one_or_none()
        if already is not None:
            raise Conflict(f"entry {seq} was already voided by entry {already}")
        budget = Budget.of(dataset)
        units = loads_units(target.units)
        budget.void(units)
        request = ledger.Append(
            "void",
            principal.actor,
            mechanism=from_params(json.loads(target.mechanism)),
            units=units,
            run_id=target.run_id,
            release_id=target.release_id,
            voids_seq=seq,
            idempotency_key=idempotency.key if idempotency else None,
            details={"reason": reason},
        )
        return 201, render(ledger.append(session, dataset, budget, request, utcnow()))

    principal.require_dataset(dataset_id)
    return write(db, operation, dataset_id=dataset_id, idempotency=idempotency)


def verify(db: Database, principal: Principal, dataset_id: str) -> ledger.Verification:
    """Recompute the chain and replay the curves of a dataset."""
    _visible_dataset(db, principal, dataset_id)
    with db.read() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return ledger.verify(session, dataset)


def _visible_dataset(db: Database, principal: Principal, dataset_id: str) -> None:
    principal.require("auditor")
    principal.require_dataset(dataset_id)
    refresh(db, dataset_id)


def entries_page(
    db: Database,
    principal: Principal,
    dataset_id: str,
    *,
    after: int,
    limit: int,
    kind: str | None,
    run_id: str | None,
) -> tuple[list[LedgerEntry], bool]:
    """One page of a dataset's ledger; and whether more follow."""
    _visible_dataset(db, principal, dataset_id)
    with db.read() as session:
        rows = ledger.entries(
            session, dataset_id, after=after, limit=limit + 1, kind=kind, run_id=run_id
        )
    return rows[:limit], len(rows) > limit


def entries_export(
    db: Database, principal: Principal, dataset_id: str, *, kind: str | None, run_id: str | None
) -> Iterator[LedgerEntry]:
    """Every matching entry, streamed from one read transaction (checked before it starts)."""
    _visible_dataset(db, principal, dataset_id)

    def generate() -> Iterator[LedgerEntry]:
        with db.read() as session:
            yield from ledger.stream(session, dataset_id, kind=kind, run_id=run_id)

    return generate()
