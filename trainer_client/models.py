"""Typed, immutable views of the service's JSON resources (docs/api.md, "Resources").

Each class has a ``from_json`` constructor that checks the fields it reads and
keeps the whole body in `raw` (so fields a newer service adds are not lost).
A field is optional (``| None``) exactly where the service's OpenAPI schema lets
it be null or absent, and a required field that is missing or null is an
``unexpected_response`` error, never a silent default:
tests/trainer_client/test_contract.py holds the two sides together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from trainer_client.errors import LedgerError

__all__ = [
    "ApiKey",
    "Dataset",
    "DecidedBy",
    "Effect",
    "Epoch",
    "EpsilonEstimate",
    "LedgerEntry",
    "NoiseCalibration",
    "OutsideGuarantee",
    "Release",
    "RunRecord",
    "Shares",
    "VerifyResult",
]


class _Body:
    """Typed reads from one JSON object; a missing or mistyped field is a clear error."""

    def __init__(self, obj: object, what: str) -> None:
        if not isinstance(obj, Mapping):
            raise _unexpected(f"{what}: expected a JSON object, got {type(obj).__name__}")
        self.obj: Mapping[str, Any] = obj
        self.what = what

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.obj:
            if optional:
                return None
            raise _unexpected(f"{self.what}: field {key!r} is missing")
        return self.obj[key]

    def _bad(self, key: str, expected: str) -> LedgerError:
        return _unexpected(f"{self.what}: field {key!r} is not {expected}: {self.obj[key]!r}")

    def text(self, key: str) -> str:
        value = self._get(key, optional=False)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def opt_text(self, key: str) -> str | None:
        value = self._get(key, optional=True)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def number(self, key: str) -> float:
        value = self.opt_number(key)
        if value is None:
            raise _unexpected(f"{self.what}: field {key!r} is missing or null")
        return value

    def opt_number(self, key: str) -> float | None:
        value = self._get(key, optional=True)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        return float(value)

    def integer(self, key: str) -> int:
        value = self.opt_integer(key)
        if value is None:
            raise _unexpected(f"{self.what}: field {key!r} is missing or null")
        return value

    def opt_integer(self, key: str) -> int | None:
        value = self._get(key, optional=True)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        return value

    def flag(self, key: str, default: bool | None = None) -> bool:
        value = self._get(key, optional=default is not None)
        if value is None and default is not None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "a boolean")
        return value

    def time(self, key: str) -> datetime:
        value = self.opt_time(key)
        if value is None:
            raise _unexpected(f"{self.what}: field {key!r} is missing or null")
        return value

    def opt_time(self, key: str) -> datetime | None:
        value = self.opt_text(key)
        if value is None:
            return None
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise self._bad(key, "an ISO 8601 time") from None

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.opt_mapping(key)
        if value is None:
            raise _unexpected(f"{self.what}: field {key!r} is missing or null")
        return value

    def opt_mapping(self, key: str) -> Mapping[str, Any] | None:
        value = self._get(key, optional=True)
        if value is not None and not isinstance(value, Mapping):
            raise self._bad(key, "an object")
        return value

    def array(self, key: str) -> list[Any]:
        value = self.opt_list(key)
        if value is None:
            raise _unexpected(f"{self.what}: field {key!r} is missing or null")
        return value

    def opt_list(self, key: str) -> list[Any] | None:
        value = self._get(key, optional=True)
        if value is not None and not isinstance(value, list):
            raise self._bad(key, "a list")
        return value


def _unexpected(message: str) -> LedgerError:
    return LedgerError(f"unexpected response: {message}", code="unexpected_response")


@dataclass(frozen=True)
class _DryRunFields:
    """Set on the answer to a ``dry_run=true`` call: nothing was written (ids are None)."""

    dry_run: bool = field(default=False, kw_only=True)


def _dry_run_fields(body: _Body) -> dict[str, Any]:
    return {"dry_run": body.flag("dry_run", default=False)}


@dataclass(frozen=True)
class Shares:
    """A dataset's filter members: a share of δ per RDP order, and the pure-ε sum.

    Fixed when the dataset was created, or, for the `first_admission` profile, by its first
    admission (`fixed_at_seq`; `weights` is empty until then); `weights` are exact fractions
    ("num/den").
    """

    profile: str
    orders: tuple[float, ...]
    weights: tuple[str, ...]
    pure_sum: bool
    plan: Mapping[str, Any] | None = field(default=None, hash=False)
    fixed_at_seq: int | None = None

    @classmethod
    def from_json(cls, obj: object) -> Shares:
        """Read a shares body."""
        b = _Body(obj, "Shares")
        weights = b.array("weights")
        if not all(isinstance(w, str) for w in weights):
            raise _unexpected(f"Shares: weights are not strings: {weights!r}")
        return cls(
            profile=b.text("profile"),
            orders=tuple(_floats(b.array("orders"), "orders")),
            weights=tuple(weights),
            pure_sum=b.flag("pure_sum"),
            plan=b.opt_mapping("plan"),
            fixed_at_seq=b.opt_integer("fixed_at_seq"),
        )


@dataclass(frozen=True)
class DecidedBy:
    """The filter member that gives a dataset's spent ε now, and a sentence saying so."""

    member: str
    order: float | None
    share: str
    delta: float
    text: str

    @classmethod
    def from_json(cls, obj: object) -> DecidedBy:
        """Read an epsilon_decided_by body."""
        b = _Body(obj, "DecidedBy")
        return cls(
            member=b.text("member"),
            order=b.opt_number("order"),
            share=b.text("share"),
            delta=b.number("delta"),
            text=b.text("text"),
        )


@dataclass(frozen=True)
class OutsideGuarantee:
    """From entry `since_seq` on, the dataset's figures are outside the filter's guarantee."""

    since_seq: int
    reason: str

    @classmethod
    def from_json(cls, obj: object) -> OutsideGuarantee:
        """Read an outside_guarantee body."""
        b = _Body(obj, "OutsideGuarantee")
        return cls(since_seq=b.integer("since_seq"), reason=b.text("reason"))


@dataclass(frozen=True)
class Effect:
    """How far one admission moved its dataset's reported ε, beside the entry's own ε."""

    epsilon: float | None
    epsilon_spent_before: float
    epsilon_spent_after: float
    epsilon_reserved_before: float
    epsilon_reserved_after: float

    @classmethod
    def from_json(cls, obj: object) -> Effect:
        """Read an effect body."""
        b = _Body(obj, "Effect")
        return cls(
            epsilon=b.opt_number("epsilon"),
            epsilon_spent_before=b.number("epsilon_spent_before"),
            epsilon_spent_after=b.number("epsilon_spent_after"),
            epsilon_reserved_before=b.number("epsilon_reserved_before"),
            epsilon_reserved_after=b.number("epsilon_reserved_after"),
        )


def _opt_effect(b: _Body) -> Effect | None:
    body = b.opt_mapping("effect")
    return None if body is None else Effect.from_json(body)


@dataclass(frozen=True)
class Dataset:
    """A dataset's budget: its cap and what is spent and reserved against it.

    `epsilon_spent` is the filter ε of the posted charges, `epsilon_reserved` that of
    charges plus holds (never below spent), `epsilon_remaining` = cap − reserved.
    `epsilon_decided_by` names the filter member that gives `epsilon_spent` (None while
    nothing is spent); `outside_guarantee` is set once a refund or a cap raised after
    charges put the figures outside the filter's guarantee.
    """

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
    shares: Shares
    epsilon_decided_by: DecidedBy | None
    outside_guarantee: OutsideGuarantee | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: object) -> Dataset:
        """Read a Dataset body."""
        b = _Body(obj, "Dataset")
        decided = b.opt_mapping("epsilon_decided_by")
        outside = b.opt_mapping("outside_guarantee")
        return cls(
            id=b.text("id"),
            description=b.text("description"),
            epsilon_cap=b.number("epsilon_cap"),
            delta=b.number("delta"),
            epsilon_spent=b.number("epsilon_spent"),
            epsilon_reserved=b.number("epsilon_reserved"),
            epsilon_remaining=b.number("epsilon_remaining"),
            frozen=b.flag("frozen"),
            ledger_seq=b.integer("ledger_seq"),
            active_runs=b.integer("active_runs"),
            created_at=b.time("created_at"),
            updated_at=b.time("updated_at"),
            shares=Shares.from_json(b.mapping("shares")),
            epsilon_decided_by=None if decided is None else DecidedBy.from_json(decided),
            outside_guarantee=None if outside is None else OutsideGuarantee.from_json(outside),
            raw=b.obj,
        )


@dataclass(frozen=True)
class RunRecord(_DryRunFields):
    """The service's record of a DP-SGD run: its plan, its noise and its status.

    `epsilon` is the plan's own ε at the dataset's δ (Opacus'
    ``make_private_with_epsilon`` meaning), not the dataset's filter figure.
    `id` is None only in a dry run. `dataset` is the dataset's budget right
    after the call that returned this record (creation, complete, abort), and
    `effect` how far that call moved its ε. `epsilon_pld` is the plan's PLD ε alone (this
    run, not adaptive: what Opacus' PRV accountant shows), never used for the cap; None with
    `epsilon_pld_note` saying why (not computed yet, or refused) or from an older service.
    """

    id: str | None
    dataset_id: str
    name: str | None
    status: str
    sampling: str
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    epochs_charged: int
    noise_multiplier: float
    max_grad_norm: float | None
    target_epsilon: float | None
    epsilon: float
    epsilon_per_epoch: float
    lease_seconds: int
    expires_at: datetime
    created_at: datetime
    updated_at: datetime
    dataset: Dataset | None = None
    effect: Effect | None = None
    epsilon_pld: float | None = None
    epsilon_pld_note: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: object) -> RunRecord:
        """Read a Run body."""
        b = _Body(obj, "Run")
        dataset = b.opt_mapping("dataset")
        return cls(
            id=b.opt_text("id"),
            dataset_id=b.text("dataset_id"),
            name=b.opt_text("name"),
            status=b.text("status"),
            sampling=b.text("sampling"),
            sample_rate=b.number("sample_rate"),
            steps_per_epoch=b.integer("steps_per_epoch"),
            epochs=b.integer("epochs"),
            epochs_charged=b.integer("epochs_charged"),
            noise_multiplier=b.number("noise_multiplier"),
            max_grad_norm=b.opt_number("max_grad_norm"),
            target_epsilon=b.opt_number("target_epsilon"),
            epsilon=b.number("epsilon"),
            epsilon_per_epoch=b.number("epsilon_per_epoch"),
            lease_seconds=b.integer("lease_seconds"),
            expires_at=b.time("expires_at"),
            created_at=b.time("created_at"),
            updated_at=b.time("updated_at"),
            dataset=None if dataset is None else Dataset.from_json(dataset),
            effect=_opt_effect(b),
            epsilon_pld=b.opt_number("epsilon_pld"),
            epsilon_pld_note=b.opt_text("epsilon_pld_note"),
            raw=b.obj,
            **_dry_run_fields(b),
        )


@dataclass(frozen=True)
class Epoch(_DryRunFields):
    """One reserved (and, unless a dry run, already charged) DP-SGD epoch.

    Train this epoch with exactly `noise_multiplier`, `sample_rate`, `steps`
    and (when the run declared it) `max_grad_norm`. `dataset` is the dataset's
    budget right after the charge.
    """

    run_id: str
    index: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float | None
    sampling: str
    beyond_plan: bool
    ledger_seq: int | None
    expires_at: datetime
    dataset: Dataset
    effect: Effect
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def epsilon_spent(self) -> float:
        """The dataset's ε spent after this epoch's charge."""
        return self.dataset.epsilon_spent

    @property
    def epsilon_cap(self) -> float:
        """The dataset's ε cap."""
        return self.dataset.epsilon_cap

    @property
    def epsilon_reserved(self) -> float:
        """The dataset's ε of charges plus holds after this epoch."""
        return self.dataset.epsilon_reserved

    @classmethod
    def from_json(cls, obj: object) -> Epoch:
        """Read an Epoch body."""
        b = _Body(obj, "Epoch")
        return cls(
            run_id=b.text("run_id"),
            index=b.integer("epoch"),
            noise_multiplier=b.number("noise_multiplier"),
            sample_rate=b.number("sample_rate"),
            steps=b.integer("steps"),
            max_grad_norm=b.opt_number("max_grad_norm"),
            sampling=b.text("sampling"),
            beyond_plan=b.flag("beyond_plan"),
            ledger_seq=b.opt_integer("ledger_seq"),
            expires_at=b.time("expires_at"),
            dataset=Dataset.from_json(b.mapping("dataset")),
            effect=Effect.from_json(b.mapping("effect")),
            raw=b.obj,
            **_dry_run_fields(b),
        )


@dataclass(frozen=True)
class Release(_DryRunFields):
    """One noisy release charged to a dataset, with the noise scale to use.

    `noise_scale` is None for a generic pure ε-DP release (``pure_dp``): the
    service calibrates no noise for it, your mechanism (e.g. the exponential
    mechanism) must be ε-DP by itself. `noised_values` is set when the service
    added the noise itself.
    """

    id: str | None
    dataset_id: str
    mechanism: str
    sensitivity: float
    noise_scale: float | None
    epsilon: float
    delta: float | None
    name: str | None
    ledger_seq: int | None
    noised_values: tuple[float, ...] | None
    created_at: datetime
    dataset: Dataset
    effect: Effect
    count: int = 1
    noised_batch: tuple[tuple[float, ...], ...] | None = None
    labels: tuple[int, ...] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: object) -> Release:
        """Read a Release body."""
        b = _Body(obj, "Release")
        values = b.opt_list("noised_values")
        batch = b.opt_list("noised_batch")
        labels = b.opt_list("labels")
        count = b.opt_integer("count")
        return cls(
            id=b.opt_text("id"),
            dataset_id=b.text("dataset_id"),
            mechanism=b.text("mechanism"),
            sensitivity=b.number("sensitivity"),
            noise_scale=b.opt_number("noise_scale"),
            epsilon=b.number("epsilon"),
            delta=b.opt_number("delta"),
            name=b.opt_text("name"),
            ledger_seq=b.opt_integer("ledger_seq"),
            noised_values=None if values is None else tuple(_floats(values, "noised_values")),
            created_at=b.time("created_at"),
            dataset=Dataset.from_json(b.mapping("dataset")),
            effect=Effect.from_json(b.mapping("effect")),
            # Answers stored before batches existed carry no count: they were one release.
            count=1 if count is None else count,
            noised_batch=None if batch is None else _vectors(batch, "noised_batch"),
            labels=None if labels is None else tuple(_integers(labels, "labels")),
            raw=b.obj,
            **_dry_run_fields(b),
        )


def _floats(values: list[Any], what: str) -> list[float]:
    out: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _unexpected(f"{what}: {value!r} is not a number")
        out.append(float(value))
    return out


def _vectors(values: list[Any], what: str) -> tuple[tuple[float, ...], ...]:
    out = []
    for vector in values:
        if not isinstance(vector, list):
            raise _unexpected(f"{what}: {vector!r} is not a list")
        out.append(tuple(_floats(vector, what)))
    return tuple(out)


def _integers(values: list[Any], what: str) -> list[int]:
    if any(isinstance(value, bool) or not isinstance(value, int) for value in values):
        raise _unexpected(f"{what}: not a list of integers: {values!r}")
    return list(values)


@dataclass(frozen=True)
class LedgerEntry:
    """One append-only, hash-chained entry of a dataset's ledger."""

    seq: int
    dataset_id: str
    kind: str
    run_id: str | None
    release_id: str | None
    voids_seq: int | None
    mechanism: Mapping[str, Any] | None = field(hash=False)
    actor: str
    idempotency_key: str | None
    epsilon: float | None
    pure: str | None
    epsilon_spent_before: float | None
    epsilon_spent_after: float
    epsilon_reserved_before: float | None
    epsilon_reserved_after: float
    details: Mapping[str, Any] = field(hash=False)
    created_at: datetime
    prev_hash: str
    hash: str
    # The actor key's name and role when the entry was written (None: an unnamed key, or an
    # entry older than names, or a server that does not send them).
    actor_name: str | None = None
    actor_role: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: object) -> LedgerEntry:
        """Read an Entry body."""
        b = _Body(obj, "Entry")
        return cls(
            seq=b.integer("seq"),
            dataset_id=b.text("dataset_id"),
            kind=b.text("kind"),
            run_id=b.opt_text("run_id"),
            release_id=b.opt_text("release_id"),
            voids_seq=b.opt_integer("voids_seq"),
            mechanism=b.opt_mapping("mechanism"),
            actor=b.text("actor"),
            idempotency_key=b.opt_text("idempotency_key"),
            epsilon=b.opt_number("epsilon"),
            pure=b.opt_text("pure"),
            epsilon_spent_before=b.opt_number("epsilon_spent_before"),
            epsilon_spent_after=b.number("epsilon_spent_after"),
            epsilon_reserved_before=b.opt_number("epsilon_reserved_before"),
            epsilon_reserved_after=b.number("epsilon_reserved_after"),
            details=b.mapping("details"),
            created_at=b.time("created_at"),
            prev_hash=b.text("prev_hash"),
            hash=b.text("hash"),
            actor_name=b.opt_text("actor_name"),
            actor_role=b.opt_text("actor_role"),
            raw=b.obj,
        )


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-checking a dataset's hash chain and replaying its entries."""

    ok: bool
    entries: int
    last_seq: int
    last_hash: str
    chain_ok: bool
    replay_ok: bool
    problems: tuple[str, ...]
    outside_guarantee: OutsideGuarantee | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: object) -> VerifyResult:
        """Read a verify body."""
        b = _Body(obj, "Verify")
        outside = b.opt_mapping("outside_guarantee")
        return cls(
            ok=b.flag("ok"),
            entries=b.integer("entries"),
            last_seq=b.integer("last_seq"),
            last_hash=b.text("last_hash"),
            chain_ok=b.flag("chain_ok"),
            replay_ok=b.flag("replay_ok"),
            problems=tuple(b.array("problems")),
            outside_guarantee=None if outside is None else OutsideGuarantee.from_json(outside),
            raw=b.obj,
        )


@dataclass(frozen=True)
class ApiKey:
    """An API key's record; `key` (the secret) is only set in the answer that created it."""

    id: str
    role: str
    datasets: tuple[str, ...] | None
    name: str | None
    created_at: datetime
    revoked_at: datetime | None
    key: str | None = field(default=None, repr=False)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: object) -> ApiKey:
        """Read a Key body."""
        b = _Body(obj, "Key")
        datasets = b.opt_list("datasets")
        return cls(
            id=b.text("id"),
            role=b.text("role"),
            datasets=None if datasets is None else tuple(str(d) for d in datasets),
            name=b.opt_text("name"),
            created_at=b.time("created_at"),
            revoked_at=b.opt_time("revoked_at"),
            key=b.opt_text("key"),
            raw=b.obj,
        )


@dataclass(frozen=True)
class EpsilonEstimate:
    """ε of a subsampled-Gaussian plan at δ."""

    epsilon: float

    @classmethod
    def from_json(cls, obj: object) -> EpsilonEstimate:
        """Read the epsilon calculator's body."""
        b = _Body(obj, "EpsilonEstimate")
        return cls(epsilon=b.number("epsilon"))


@dataclass(frozen=True)
class NoiseCalibration:
    """The smallest noise multiplier meeting a target ε, and the ε it gives."""

    noise_multiplier: float
    epsilon: float

    @classmethod
    def from_json(cls, obj: object) -> NoiseCalibration:
        """Read the noise-multiplier calculator's body."""
        b = _Body(obj, "NoiseCalibration")
        return cls(noise_multiplier=b.number("noise_multiplier"), epsilon=b.number("epsilon"))
