"""SQLAlchemy models. Curves are JSON arrays of integer units (accountant.exact)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table."""


ROLES = ("admin", "trainer", "auditor")
RUN_STATUSES = ("active", "completed", "aborted", "expired")
ENTRY_KINDS = (
    "dataset_created",
    "hold",
    "charge",
    "release_hold",
    "void",
    "cap_change",
    "freeze",
    "unfreeze",
    "description_change",
    "correction",
    "hold_top_up",
)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class ApiKey(Base):
    """An API key: only the SHA-256 of its secret is stored."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(_one_of("role", ROLES), name="ck_api_keys_role"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    datasets: Mapped[str | None] = mapped_column(Text)  # JSON list, NULL = every dataset
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Dataset(Base):
    """A dataset's budget and the cached composition of its ledger."""

    __tablename__ = "datasets"
    __table_args__ = (
        CheckConstraint("epsilon_cap >= 0", name="ck_datasets_cap"),
        CheckConstraint("delta > 0 AND delta < 1", name="ck_datasets_delta"),
        CheckConstraint("last_seq >= 0", name="ck_datasets_seq"),
        CheckConstraint("active_runs >= 0", name="ck_datasets_active_runs"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    epsilon_cap: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    frozen: Mapped[bool] = mapped_column(Boolean, default=False)
    orders: Mapped[str] = mapped_column(Text)  # JSON list of floats: the dataset's order grid
    # The filter's members, fixed at creation (migration 0004): JSON of the shares of δ.
    shares: Mapped[str] = mapped_column(Text)
    # Exact pure-ε sums (accountant.members.PureTotal text) of posted charges and pending
    # holds; NULL for datasets whose filter has no pure-sum member (created before 0004).
    pure_posted: Mapped[str | None] = mapped_column(Text)
    pure_pending: Mapped[str | None] = mapped_column(Text)
    # From this entry on the figures are outside the filter's guarantee (a refund, a cap
    # raised after charges); NULL while they are within it.
    outside_guarantee_seq: Mapped[int | None] = mapped_column(Integer)
    outside_guarantee_reason: Mapped[str | None] = mapped_column(Text)
    posted_units: Mapped[str] = mapped_column(Text)  # JSON list of ints
    pending_units: Mapped[str] = mapped_column(Text)  # JSON list of ints
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    last_hash: Mapped[str] = mapped_column(String(64))
    # Kept with every admission, so that none has to ask `runs` (migration 0002):
    active_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # No active run's lease ends before this (a lower bound; NULL: no active run).
    lapse_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Shuffle runs charged under the old shuffle charge await their correction entries
    # (migration 0003; holds.correct clears it in the dataset's next write transaction).
    corrections_due: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Run(Base):
    """A DP-SGD run: a plan held on its dataset, charged epoch by epoch."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_one_of("status", RUN_STATUSES), name="ck_runs_status"),
        CheckConstraint(_one_of("sampling", ("poisson", "shuffle")), name="ck_runs_sampling"),
        CheckConstraint("sample_rate > 0 AND sample_rate <= 1", name="ck_runs_sample_rate"),
        CheckConstraint("steps_per_epoch >= 1 AND epochs >= 1", name="ck_runs_plan"),
        CheckConstraint("epochs_charged >= 0", name="ck_runs_charged"),
        CheckConstraint("noise_multiplier > 0", name="ck_runs_sigma"),
        Index("ix_runs_dataset_status_expiry", "dataset_id", "status", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    sampling: Mapped[str] = mapped_column(String(16))
    sample_rate: Mapped[float] = mapped_column(Float)
    steps_per_epoch: Mapped[int] = mapped_column(Integer)
    epochs: Mapped[int] = mapped_column(Integer)
    epochs_charged: Mapped[int] = mapped_column(Integer, default=0)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    max_grad_norm: Mapped[float | None] = mapped_column(Float)
    target_epsilon: Mapped[float | None] = mapped_column(Float)
    epsilon: Mapped[float] = mapped_column(Float)
    epsilon_per_epoch: Mapped[float] = mapped_column(Float)
    # The plan's PLD ε alone (shown, never a filter figure; service/domain/run_pld.py): both
    # NULL until computed, then the figure, or NULL and why the PLD accountant refused it.
    epsilon_pld: Mapped[float | None] = mapped_column(Float)
    epsilon_pld_note: Mapped[str | None] = mapped_column(Text)
    epoch_units: Mapped[str] = mapped_column(Text)  # JSON list of ints: one epoch's curve
    lease_seconds: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Release(Base):
    """One noisy release charged to a dataset."""

    __tablename__ = "releases"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    mechanism: Mapped[str] = mapped_column(String(32))
    sensitivity: Mapped[float] = mapped_column(Float)
    noise_scale: Mapped[float | None] = mapped_column(Float)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float)
    name: Mapped[str | None] = mapped_column(String(200))
    ledger_seq: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LedgerEntry(Base):
    """One append-only, hash-chained ledger entry."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("seq >= 1", name="ck_ledger_seq"),
        CheckConstraint(_one_of("kind", ENTRY_KINDS), name="ck_ledger_kind"),
        UniqueConstraint("dataset_id", "voids_seq", name="uq_ledger_one_void_per_charge"),
        Index("ix_ledger_run", "dataset_id", "run_id"),
    )

    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str | None] = mapped_column(String(40))
    release_id: Mapped[str | None] = mapped_column(String(40))
    voids_seq: Mapped[int | None] = mapped_column(Integer)
    mechanism: Mapped[str | None] = mapped_column(Text)  # JSON object
    units: Mapped[str | None] = mapped_column(Text)  # JSON list of ints
    actor: Mapped[str] = mapped_column(String(40))
    # The actor key's name and role at write time (migration 0005; NULL on older entries).
    actor_name: Mapped[str | None] = mapped_column(String(200))
    actor_role: Mapped[str | None] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    epsilon: Mapped[float | None] = mapped_column(Float)
    # Entries written since migration 0004 carry the dataset's figures before them too, and
    # their pure-ε part (hashed only when present, so older entries' hashes stand).
    epsilon_spent_before: Mapped[float | None] = mapped_column(Float)
    epsilon_reserved_before: Mapped[float | None] = mapped_column(Float)
    pure: Mapped[str | None] = mapped_column(Text)
    epsilon_spent_after: Mapped[float] = mapped_column(Float)
    epsilon_reserved_after: Mapped[float] = mapped_column(Float)
    details: Mapped[str] = mapped_column(Text)  # JSON object
    created_at: Mapped[str] = mapped_column(String(40))  # ISO text: hashed as stored
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class IdempotencyRecord(Base):
    """The first successful response to an (API key, Idempotency-Key) pair."""

    __tablename__ = "idempotency_records"

    holder: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


def utcnow() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)
