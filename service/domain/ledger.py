"""The append-only, hash-chained ledger: appending, reading, verifying, replaying.

Each entry's hash is SHA-256 over `prev_hash` and a canonical JSON encoding of
every other field (sorted keys, no whitespace, floats by repr, which
round-trips exactly). Fields added by migrations 0004 (the figures before the
entry, its pure-ε part) and 0005 (the actor's name and role) are hashed only
when present, so entries written before them keep their hashes. Replaying the
entries in order — hold: pending += cost; charge: posted += cost (and
pending -= cost when it came from a hold); release_hold: pending -= cost; void
with units (a refund, or any void written before 0004): posted -= cost; void
without units: nothing (the cost is kept); correction: posted += cost;
hold_top_up: pending += cost — must reproduce the dataset row's cached curves
and pure sums exactly (integers and fractions, so there is no rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from accountant import exact
from accountant.mechanisms import Mechanism
from accountant.members import PureTotal
from service.domain.budget import (
    FIRST_ADMISSION,
    Budget,
    Cost,
    loads_pure,
    loads_units,
)
from service.storage.database import stage_row

# Re-exported: the ledger routes name entries and their kinds from here, not from storage.
from service.storage.models import ENTRY_KINDS as ENTRY_KINDS
from service.storage.models import Dataset, Run
from service.storage.models import LedgerEntry as LedgerEntry

GENESIS_HASH = "0" * 64
_VERIFY_BATCH = 2000


def iso(moment: datetime) -> str:
    """A timestamp as stored in entries: ISO 8601 UTC with microseconds and a Z (the text of
    `strftime("%Y-%m-%dT%H:%M:%S.%fZ")`, made faster: its first 26 characters are the same)."""
    return moment.isoformat(timespec="microseconds")[:26] + "Z"


def canonical(payload: dict[str, Any]) -> str:
    """The canonical JSON text an entry's hash covers."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# Hashed only when present: entries written before migration 0004 have none of them.
_OPTIONAL_HASHED = ("epsilon_spent_before", "epsilon_reserved_before", "pure")
# Every field an entry's hash covers (the optional ones when present), beside the actor's name
# and role, which are covered when the role is (`_hashed_names`).
_HASHED = (
    *_OPTIONAL_HASHED,
    "dataset_id",
    "seq",
    "kind",
    "run_id",
    "release_id",
    "voids_seq",
    "mechanism",
    "units",
    "actor",
    "idempotency_key",
    "epsilon",
    "epsilon_spent_after",
    "epsilon_reserved_after",
    "details",
    "created_at",
)


def _hashed_names(row: dict[str, Any]) -> list[str]:
    """The fields an entry's hash covers, given its stored values by name."""
    names = [name for name in _HASHED if name not in _OPTIONAL_HASHED or row[name] is not None]
    # Who, by name and role (migration 0005): hashed only for entries that carry it, so every
    # older entry's hash still verifies; a new entry always has a role, so removing the pair
    # from it changes its hash. An unnamed key hashes as "actor_name": null.
    if row["actor_role"] is not None:
        names += ("actor_name", "actor_role")
    return names


def _hashed_fields(entry: LedgerEntry) -> dict[str, Any]:
    """What an entry's hash covers: its stored fields, the JSON ones decoded (their canonical
    encoding is then what is hashed, whatever text was stored)."""
    row = {column.key: getattr(entry, column.key) for column in LedgerEntry.__table__.columns}
    fields = {name: row[name] for name in _hashed_names(row)}
    fields["mechanism"] = json.loads(entry.mechanism) if entry.mechanism else None
    fields["units"] = loads_units(entry.units) if entry.units else None
    fields["details"] = json.loads(entry.details)
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
    cost: Cost | None = None
    run_id: str | None = None
    release_id: str | None = None
    voids_seq: int | None = None
    idempotency_key: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Effect:
    """How far one entry moved its dataset's reported ε, beside its own ε (None: no cost)."""

    epsilon: float | None
    epsilon_spent_before: float | None
    epsilon_spent_after: float
    epsilon_reserved_before: float | None
    epsilon_reserved_after: float


@dataclass(frozen=True)
class Written:
    """An entry just appended: the row staged for the commit, and what callers read of it."""

    row: dict[str, Any]

    @property
    def seq(self) -> int:
        """The entry's sequence number."""
        return int(self.row["seq"])

    @property
    def effect(self) -> Effect:
        """How far the entry moved its dataset's reported ε."""
        row = self.row
        return Effect(
            row["epsilon"],
            row["epsilon_spent_before"],
            row["epsilon_spent_after"],
            row["epsilon_reserved_before"],
            row["epsilon_reserved_after"],
        )

    def entry(self) -> LedgerEntry:
        """The entry as a (transient) row object, for the rare caller that renders it whole."""
        return LedgerEntry(**self.row)


def append(
    session: Session, dataset: Dataset, budget: Budget, request: Append, now: datetime
) -> Written:
    """Append one entry to a locked dataset whose budget already reflects it; store the curves.

    The entry records the dataset's figures before it (as last stored) and after it. It is
    staged as a plain row (no ORM object: this runs once per admission, under the lock), and
    its hash is taken over the canonical text spliced from the encodings it stores
    (`_canonical_text`), which equals `canonical(_hashed_fields(entry))` of the stored row.
    """
    details = request.details
    if budget.fixing:
        # The first admission of a first_admission dataset: this entry records the shares.
        budget.settle_shares(dataset.last_seq + 1)
        details = {**details, "shares": budget.shares.public()}
    budget.store(dataset)
    budget.fixing = False
    cost = request.cost
    pure = budget.entry_pure(cost) if cost is not None else None
    params = request.mechanism.params() if request.mechanism else None
    spent_before, reserved_before = budget.reported or (None, None)
    spent_after, reserved_after = budget.epsilon_spent(), budget.epsilon_reserved()
    actor = request.actor
    mechanism = canonical(params) if params is not None else None
    units = cost.text if cost is not None else None
    details_text = canonical(details)
    row: dict[str, Any] = {
        "dataset_id": dataset.id,
        "seq": dataset.last_seq + 1,
        "kind": request.kind,
        "run_id": request.run_id,
        "release_id": request.release_id,
        "voids_seq": request.voids_seq,
        "mechanism": mechanism,
        "units": units,
        "pure": pure.to_text() if pure is not None else None,
        "actor": actor.id,
        "actor_name": actor.name,
        "actor_role": actor.role,
        "idempotency_key": request.idempotency_key,
        "epsilon": budget.own_epsilon(cost) if cost is not None else None,
        "epsilon_spent_before": spent_before,
        "epsilon_reserved_before": reserved_before,
        "epsilon_spent_after": spent_after,
        "epsilon_reserved_after": reserved_after,
        "details": details_text,
        "created_at": iso(now),
        "prev_hash": dataset.last_hash,
    }
    digest = hashlib.sha256(row["prev_hash"].encode("ascii"))
    digest.update(_canonical_text(row).encode("utf-8"))
    row["hash"] = digest.hexdigest()
    dataset.last_seq = budget.seq = row["seq"]
    dataset.last_hash = row["hash"]
    dataset.updated_at = now
    budget.reported = (spent_after, reserved_after)
    stage_row(session, LedgerEntry, row)
    return Written(row)


# The stored columns whose text is itself canonical JSON: spliced into the hashed text as is.
_ENCODED = frozenset({"mechanism", "units", "details"})
_SCALAR = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


def _canonical_text(row: dict[str, Any]) -> str:
    """`canonical(_hashed_fields(entry))` for a new entry's row, without decoding and encoding
    again what it stores as canonical JSON (its mechanism, units and details): the canonical
    encoding of an object is its sorted keys with each value's own canonical encoding, so the
    stored texts are the values' encodings. `test_spliced_canonical_text_is_canonical` checks
    the two agree."""
    parts = []
    for name in sorted(_hashed_names(row)):
        value = row[name]
        if name in _ENCODED:
            encoded = "null" if value is None else value
        elif value is None:
            encoded = "null"
        elif type(value) is str:
            encoded = encode_basestring_ascii(value)
        elif type(value) is int or (type(value) is float and math.isfinite(value)):
            encoded = repr(value)  # what the JSON encoder writes for these
        else:
            encoded = _SCALAR(value)
        parts.append(f'"{name}":{encoded}')
    return "{" + ",".join(parts) + "}"


def entry_cost(entry: LedgerEntry) -> Cost | None:
    """The cost an entry moved (None when it moved no curve)."""
    if entry.units is None:
        return None
    return Cost(loads_units(entry.units), loads_pure(entry.pure) or PureTotal())


def apply(budget: Budget, entry: LedgerEntry) -> None:
    """Replay one entry's effect on the curves and pure sums."""
    cost = entry_cost(entry)
    if cost is None:
        return
    if budget.has_pure_sum and entry.pure is None:
        raise ValueError(f"a {entry.kind} entry without its pure-ε part on a pure-sum dataset")
    if entry.kind == "hold":
        budget.hold(cost)
    elif entry.kind == "charge":
        budget.charge(cost, from_hold=bool(json.loads(entry.details).get("from_hold")))
    elif entry.kind == "release_hold":
        budget.release(cost)
    elif entry.kind == "void":
        budget.refund(cost)
    elif entry.kind == "correction":
        budget.charge(cost, from_hold=False)
    elif entry.kind == "hold_top_up":
        budget.hold(cost)


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


def guarantee_breach(entry: LedgerEntry, charged: bool) -> str | None:
    """Why this entry takes its dataset outside the filter's guarantee (None if it does not).

    A void that subtracts its charge's cost (a refund; every void before migration 0004)
    admits again the budget of an output that was handed out; a cap raised after a charge
    is not the cap fixed in advance that the filter theorem needs (DESIGN.md §3).
    `charged`: whether a charge came before this entry.
    """
    if entry.kind == "void" and entry.units is not None:
        return f"entry {entry.seq} refunded the cost of charge {entry.voids_seq}"
    if entry.kind == "cap_change" and charged:
        change = json.loads(entry.details)
        if change["new"] > change["old"]:
            return f"entry {entry.seq} raised the cap from {change['old']:g} to {change['new']:g}"
    return None


def note_breach(dataset: Dataset, entry: LedgerEntry, charged: bool) -> None:
    """Mark the dataset outside the guarantee from `entry` on, if it breaches it (first wins)."""
    reason = guarantee_breach(entry, charged)
    if reason is not None and dataset.outside_guarantee_seq is None:
        dataset.outside_guarantee_seq = entry.seq
        dataset.outside_guarantee_reason = reason


def outside_guarantee(dataset: Dataset) -> dict[str, Any] | None:
    """{since_seq, reason} when the dataset's figures are outside the filter's guarantee."""
    if dataset.outside_guarantee_seq is None:
        return None
    return {"since_seq": dataset.outside_guarantee_seq, "reason": dataset.outside_guarantee_reason}


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
    outside_guarantee: dict[str, Any] | None = None


def _legacy_shares(orders: list[float]) -> dict[str, Any]:
    """The shares migration 0004 gave a dataset created before it: uniform, no pure sum."""
    n = len(orders)
    weights = [f"1/{n}"] * n
    return {
        "profile": "uniform",
        "orders": orders,
        "weights": weights,
        "pure_sum": False,
        "plan": None,
    }


def _check_created(entry: LedgerEntry, cached: Budget) -> str | None:
    details = json.loads(entry.details)
    stored = cached.shares
    shares = stored.public()
    recorded = details.get("shares", _legacy_shares(details.get("orders", [])))
    # A first_admission dataset recorded no weights at creation; its first admission did.
    expected = stored.unfixed_form() if stored.profile == FIRST_ADMISSION else shares
    if entry.kind != "dataset_created" or recorded != expected:
        return "the dataset's shares are not the ones its dataset_created entry recorded"
    if list(cached.orders) != shares["orders"]:
        return "the dataset's order grid is not its shares' grid"
    return None


def _check_fixing(entry: LedgerEntry, cached: Budget, moved: bool) -> str | None:
    """A first_admission dataset's shares: recorded by the entry that fixed them, which is its
    first entry to move a curve; no other entry records shares."""
    stored = cached.shares
    # Parsed only when the canonical text can hold the key (verify reads every entry).
    details: dict[str, Any] = {}
    if entry.kind != "dataset_created" and '"shares":' in entry.details:
        details = json.loads(entry.details)
    records = "shares" in details
    if stored.profile != FIRST_ADMISSION or stored.fixed_at_seq != entry.seq:
        return "it records shares, but did not fix the dataset's" if records else None
    if not records or details["shares"] != stored.public():
        return "it fixed the dataset's shares but does not record them as the dataset holds them"
    if moved or entry.units is None:
        return "the shares were not fixed by the dataset's first admission"
    return None


def verify(session: Session, dataset: Dataset, *, max_problems: int = 50) -> Verification:
    """Recompute every hash, check seq has no gaps, replay the curves, pure sums, shares,
    figures before each entry and the guarantee mark against the cache, and check the
    dataset's cached run count and lapse bound against its runs."""
    problems: list[str] = []
    chain_ok = True
    cached = Budget.of(dataset)
    zero = [0] * len(cached.orders)
    pure_zero = PureTotal() if cached.has_pure_sum else None
    replayed = Budget(
        cached.filter, cached.shares, cached.orders, zero, list(zero), pure_zero, pure_zero
    )
    previous_hash, expected_seq, count = GENESIS_HASH, 1, 0
    previous_after = (0.0, 0.0)  # before the first entry nothing is spent
    charged, breach, moved = False, None, False

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
        if entry.seq == 1 and (mismatch := _check_created(entry, cached)) is not None:
            problem(f"seq 1: {mismatch}")
        if (mismatch := _check_fixing(entry, cached, moved)) is not None:
            problem(f"seq {entry.seq}: {mismatch}")
        moved = moved or entry.units is not None
        before = (entry.epsilon_spent_before, entry.epsilon_reserved_before)
        if before != (None, None) and before != previous_after:
            problem(f"seq {entry.seq}: its figures before are not the previous entry's after")
        if breach is None and (reason := guarantee_breach(entry, charged)) is not None:
            breach = {"since_seq": entry.seq, "reason": reason}
        charged = charged or entry.kind == "charge"
        try:
            apply(replayed, entry)
        except (ValueError, json.JSONDecodeError) as exc:
            problem(f"seq {entry.seq}: cannot replay: {exc}")
        previous_hash, expected_seq = entry.hash, entry.seq + 1
        previous_after = (entry.epsilon_spent_after, entry.epsilon_reserved_after)

    if cached.shares.unfixed and moved:
        problem("entries moved the curves, but the dataset's shares were never fixed")
    if cached.shares.profile == FIRST_ADMISSION and not cached.shares.unfixed and not moved:
        problem("the dataset's shares are fixed, but no entry admitted anything")
    if dataset.last_seq != expected_seq - 1 or dataset.last_hash != previous_hash:
        chain_ok = False
        problem("the dataset's head (last_seq/last_hash) does not match the last entry")
    replay_ok = (
        replayed.posted == cached.posted
        and replayed.pending == cached.pending
        and replayed.pure_posted == cached.pure_posted
        and replayed.pure_pending == cached.pure_pending
    )
    if not replay_ok:
        problem("replaying the entries does not reproduce the cached curves and pure-ε sums")
    if breach != outside_guarantee(dataset):
        problem(f"the ledger puts the dataset outside the guarantee as {breach}; it says otherwise")
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
    return Verification(
        ok, count, expected_seq - 1, previous_hash, chain_ok, replay_ok, problems, breach
    )


def zero_units(orders: tuple[float, ...]) -> list[int]:
    """An all-zero curve on a grid."""
    return exact.to_units([0.0] * len(orders))
