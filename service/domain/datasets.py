"""Datasets: creation, reading (with lazy hold expiry), admin changes, voids, verification.

A dataset's filter shares of δ are fixed once and never change (docs/accounting.md §3.1):
`first_admission` (the default: 19/20 of δ on the order where a history shaped like the first
admitted request converts best, fixed by that admission, before any output), `default`
(fixed at creation from the cap and δ: most of δ where a Gaussian-shaped history reaching
the cap converts best), `dp_sgd` (fixed at creation, its heavy order placed for a planned run
shape), `uniform`, or explicit weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from accountant import DEFAULT_ORDERS
from accountant.mechanisms import from_params
from accountant.members import (
    Decision,
    PureTotal,
    default_shares,
    explicit_shares,
    uniform_shares,
)
from service.domain import holds, ledger
from service.domain.budget import Budget, StoredShares, dumps_units, share_of, unfixed_shares
from service.domain.errors import CapBelowReserved, Conflict, InvalidRequest, NotFound
from service.domain.keys import Principal
from service.domain.pipeline import Admission, Idempotency, Pipeline, Replayed
from service.storage.database import write_staged
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
    shares: dict[str, Any]
    epsilon_decided_by: dict[str, Any] | None
    outside_guarantee: dict[str, Any] | None


def decided_by(budget: Budget, decision: Decision) -> dict[str, Any] | None:
    """Which member gives the dataset's spent ε, with a sentence a trainer understands."""
    member = decision.member
    if member is None:
        return None
    if member.kind == "pure_sum":
        return {
            "member": "pure_sum",
            "order": None,
            "share": "0",
            "delta": 0.0,
            "text": "Sum of pure ε: every charge so far is pure ε-DP (Laplace, pure_dp), so "
            "the spent ε is exactly the sum of their ε (basic composition), using none of δ.",
        }
    assert member.order is not None
    share = share_of(budget.shares.shares, member.order)
    delta = budget.filter.delta * share.numerator / share.denominator
    return {
        "member": "rdp",
        "order": member.order,
        "share": f"{share.numerator}/{share.denominator}",
        "delta": delta,
        "text": f"RDP at α = {member.order:g}: the charges' composed Rényi curve gives the "
        f"smallest ε at this order, which holds {float(share):.3g} of the dataset's δ "
        f"({delta:.3g}); an entry's own ε is at the full δ, so it can differ from how far "
        "it moves the dataset.",
    }


def view(dataset: Dataset, budget: Budget | None = None) -> DatasetView:
    """The caller-facing view of a dataset row."""
    budget = budget or Budget.of(dataset)
    reserved = budget.epsilon_reserved()
    spent = budget.spent_decision()
    return DatasetView(
        id=dataset.id,
        description=dataset.description,
        epsilon_cap=dataset.epsilon_cap,
        delta=dataset.delta,
        epsilon_spent=spent.epsilon,
        epsilon_reserved=reserved,
        epsilon_remaining=max(0.0, dataset.epsilon_cap - reserved),
        frozen=dataset.frozen,
        ledger_seq=dataset.last_seq,
        active_runs=dataset.active_runs,
        created_at=dataset.created_at,
        updated_at=dataset.updated_at,
        shares=budget.shares.public(),
        epsilon_decided_by=decided_by(budget, spent),
        outside_guarantee=ledger.outside_guarantee(dataset),
    )


@dataclass(frozen=True)
class SharesChoice:
    """How an admin wants δ shared among the filter's members."""

    profile: str = "first_admission"
    sample_rate: float | None = None
    steps: int | None = None
    orders: tuple[float, ...] | None = None
    weights: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """What an admin gives to create a dataset."""

    id: str
    epsilon_cap: float
    delta: float
    description: str = ""
    shares: SharesChoice = SharesChoice()


def choose_shares(spec: DatasetSpec) -> StoredShares:
    """The shares a new dataset gets; InvalidRequest when the choice cannot be honoured."""
    choice = spec.shares
    try:
        if choice.profile == "uniform":
            return StoredShares("uniform", uniform_shares(DEFAULT_ORDERS, pure_sum=True))
        if choice.profile == "explicit":
            if choice.orders is None or choice.weights is None:
                raise InvalidRequest("explicit shares need orders and weights")
            weights = [Fraction(w) for w in choice.weights]
            return StoredShares("explicit", explicit_shares(choice.orders, weights))
        if choice.profile == "first_admission":
            # Fixed by the first admission, with the cap of that moment (any cap, 0 included).
            return unfixed_shares()
        if spec.epsilon_cap == 0:
            # No history reaches a cap of 0, so no order is where one converts best.
            raise InvalidRequest(
                f"the {choice.profile} shares need a cap above 0; choose uniform or explicit"
            )
        if choice.profile == "dp_sgd":
            if choice.sample_rate is None or choice.steps is None:
                raise InvalidRequest("dp_sgd shares need the planned sample_rate and steps")
            plan = (choice.sample_rate, choice.steps)
            return StoredShares(
                "dp_sgd",
                default_shares(spec.epsilon_cap, spec.delta, plan=plan),
                {"sample_rate": choice.sample_rate, "steps": choice.steps},
            )
        return StoredShares("default", default_shares(spec.epsilon_cap, spec.delta))
    except (ValueError, ZeroDivisionError) as exc:
        raise InvalidRequest(f"shares: {exc}") from None


@dataclass(frozen=True)
class DatasetPatch:
    """An admin's change to a dataset (None = unchanged)."""

    epsilon_cap: float | None = None
    frozen: bool | None = None
    description: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class DatasetCreated:
    """A new dataset, with its `dataset_created` entry written."""

    dataset: DatasetView


@dataclass(frozen=True)
class DatasetChanged:
    """A dataset after an admin's change (each changed field its own entry)."""

    dataset: DatasetView


@dataclass(frozen=True)
class Voided:
    """The `void` entry written for a charge."""

    entry: LedgerEntry


def create(
    pipeline: Pipeline,
    principal: Principal,
    spec: DatasetSpec,
    idempotency: Idempotency | None = None,
) -> DatasetCreated | Replayed:
    """Create a dataset with a zero budget, its shares, and its `dataset_created` entry."""
    principal.require("admin")
    stored = choose_shares(spec)

    def decide(session: Session, _: Dataset | None) -> DatasetCreated:
        if session.get(Dataset, spec.id) is not None:
            raise Conflict(f"dataset {spec.id!r} already exists")
        now = utcnow()
        orders = stored.shares.orders
        zero = ledger.zero_units(orders)
        nothing = PureTotal().to_text()
        dataset = Dataset(
            id=spec.id,
            description=spec.description,
            epsilon_cap=spec.epsilon_cap,
            delta=spec.delta,
            frozen=False,
            orders=json.dumps(list(orders)),
            shares=stored.to_json(),
            posted_units=dumps_units(zero),
            pending_units=dumps_units(zero),
            pure_posted=nothing,
            pure_pending=nothing,
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
            "shares": stored.public(),
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
        return DatasetCreated(view(dataset, budget))

    return pipeline.submit(Admission(decide, idempotency=idempotency))


def refresh(pipeline: Pipeline, dataset_id: str) -> Dataset:
    """The dataset row, its owed corrections appended and lapsed holds expired first if it may
    have any (the lazy expiry on read); NotFound if there is no such dataset."""
    with pipeline.db.read() as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    if not holds.due(dataset, utcnow()):
        return dataset

    def decide(session: Session, locked: Dataset | None) -> Dataset:
        assert locked is not None
        holds.expire(session, locked, Budget.of(locked), utcnow())
        return locked

    result = pipeline.submit(Admission(decide, dataset_id=dataset_id))
    assert isinstance(result, Dataset)
    return result


def get(pipeline: Pipeline, principal: Principal, dataset_id: str) -> DatasetView:
    """One dataset (expiring its lapsed holds first)."""
    principal.require("trainer", "auditor")
    principal.require_dataset(dataset_id)
    return view(refresh(pipeline, dataset_id))


def listing(
    pipeline: Pipeline, principal: Principal, *, after: str | None, limit: int
) -> tuple[list[DatasetView], bool]:
    """Datasets visible to the key, in id order after a cursor; and whether more follow."""
    principal.require("trainer", "auditor")
    db = pipeline.db
    with db.read() as session:
        lapsed = holds.datasets_due(session, utcnow())
    for dataset_id in lapsed:
        if principal.sees(dataset_id):
            refresh(pipeline, dataset_id)
    with db.read() as session:
        statement = select(Dataset).order_by(Dataset.id).limit(limit + 1)
        if after:
            statement = statement.where(Dataset.id > after)
        if principal.datasets is not None:
            statement = statement.where(Dataset.id.in_(sorted(principal.datasets)))
        rows = list(session.execute(statement).scalars())
        return [view(d) for d in rows[:limit]], len(rows) > limit


def update(
    pipeline: Pipeline,
    principal: Principal,
    dataset_id: str,
    patch: DatasetPatch,
    idempotency: Idempotency | None = None,
) -> DatasetChanged | Replayed:
    """Apply an admin's change; every changed field becomes its own ledger entry."""
    principal.require("admin")
    key = idempotency.key if idempotency else None

    def decide(session: Session, dataset: Dataset | None) -> DatasetChanged:
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
            budget = Budget.of(dataset)
            written = ledger.append(session, dataset, budget, entry, now)
            # A cap raised after a charge is not the cap fixed in advance the filter needs.
            ledger.note_breach(dataset, written.entry(), charged=any(budget.posted))
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
        return DatasetChanged(view(dataset))

    principal.require_dataset(dataset_id)
    return pipeline.submit(Admission(decide, dataset_id=dataset_id, idempotency=idempotency))


def _check_lower_cap(budget: Budget, epsilon_cap: float, old: float) -> None:
    """Refuse a lower cap whose filter would not admit what is posted and held.

    Held epochs post later without a new admission, so a cap they no longer fit under would
    let the reported ε pass the cap (docs/accounting.md, "Lowering a cap").
    """
    if budget.admits_under_cap(epsilon_cap):
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
    pipeline: Pipeline,
    principal: Principal,
    dataset_id: str,
    seq: int,
    reason: str,
    idempotency: Idempotency | None = None,
    *,
    refund: bool = False,
) -> Voided | Replayed:
    """Void a charge with a `void` entry (nothing is ever updated or deleted).

    By default the charge's cost is kept: its output (a σ, noised values) was handed out and
    may have been used, so the entry moves no curve. With `refund` the cost is subtracted,
    which admits that budget again; from then on the dataset is outside the filter's guarantee
    and says so.
    """
    principal.require("admin")

    def decide(session: Session, dataset: Dataset | None) -> Voided:
        assert dataset is not None
        write_staged(session)  # entries of this batch's earlier admissions are read below
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
        cost = ledger.entry_cost(target)
        assert cost is not None
        if refund:
            budget.refund(cost)
        request = ledger.Append(
            "void",
            principal.actor,
            mechanism=from_params(json.loads(target.mechanism)),
            cost=cost if refund else None,
            run_id=target.run_id,
            release_id=target.release_id,
            voids_seq=seq,
            idempotency_key=idempotency.key if idempotency else None,
            details={"reason": reason, "refund": refund},
        )
        written = ledger.append(session, dataset, budget, request, utcnow())
        entry = written.entry()
        ledger.note_breach(dataset, entry, charged=True)
        return Voided(entry)

    principal.require_dataset(dataset_id)
    return pipeline.submit(Admission(decide, dataset_id=dataset_id, idempotency=idempotency))


def verify(pipeline: Pipeline, principal: Principal, dataset_id: str) -> ledger.Verification:
    """Recompute the chain and replay the curves of a dataset."""
    _visible_dataset(pipeline, principal, dataset_id)
    with pipeline.db.read() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return ledger.verify(session, dataset)


def _visible_dataset(pipeline: Pipeline, principal: Principal, dataset_id: str) -> None:
    principal.require("auditor")
    principal.require_dataset(dataset_id)
    refresh(pipeline, dataset_id)


def entries_page(
    pipeline: Pipeline,
    principal: Principal,
    dataset_id: str,
    *,
    after: int,
    limit: int,
    kind: str | None,
    run_id: str | None,
) -> tuple[list[LedgerEntry], bool]:
    """One page of a dataset's ledger; and whether more follow."""
    _visible_dataset(pipeline, principal, dataset_id)
    with pipeline.db.read() as session:
        rows = ledger.entries(
            session, dataset_id, after=after, limit=limit + 1, kind=kind, run_id=run_id
        )
    return rows[:limit], len(rows) > limit


def entries_export(
    pipeline: Pipeline,
    principal: Principal,
    dataset_id: str,
    *,
    kind: str | None,
    run_id: str | None,
) -> Iterator[LedgerEntry]:
    """Every matching entry, streamed from one read transaction (checked before it starts)."""
    _visible_dataset(pipeline, principal, dataset_id)

    def generate() -> Iterator[LedgerEntry]:
        with pipeline.db.read() as session:
            yield from ledger.stream(session, dataset_id, kind=kind, run_id=run_id)

    return generate()
