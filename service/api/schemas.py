"""Request and response schemas (separate models for what comes in and what goes out)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from accountant import MIN_PROBABILITY
from service.storage.models import ENTRY_KINDS

# Numbers must be JSON numbers: lax parsing would read `true` as 1 and "0.5" as 0.5. Strict mode
# says so on the number schema itself, so a field's bounds land there too and are published as
# JSON Schema keywords. (A before-validator wrapping the number hid it from the bounds of an
# optional field: pydantic then enforced them in an after-validator and published them under its
# own names, `ge`/`le`, which no client or fuzzer reads.)
Real = Annotated[float, Strict()]


def _json_integer(value: Any) -> Any:
    """Integers must be JSON numbers with no fraction (JSON Schema's `integer`: 3 and 3.0 alike)."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON integer, not a boolean or a string")
    return value


# Not strict: JSON Schema's `integer` admits 3.0, and so does lax int (3.5 it refuses). An optional
# count takes its bounds before this validator, inside the Annotated, for the reason above.
Count = Annotated[int, BeforeValidator(_json_integer)]
# Timestamps stay the exact strings the ledger stores and hashes (RFC 3339, UTC, microseconds, Z):
# typed as strings so nothing re-serializes them, published as `date-time`.
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
Role = Literal["admin", "trainer", "auditor"]
Sampling = Literal["poisson", "shuffle"]
RunStatus = Literal["active", "completed", "aborted", "expired"]
Mechanism = Literal["gaussian", "laplace", "pure_dp", "noisy_argmax"]
EntryKind = Literal[ENTRY_KINDS]  # type: ignore[valid-type]
DatasetId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# Free text: PostgreSQL cannot store NUL characters, so neither backend accepts them.
_NO_NUL = r"^[^\x00]*$"
Name = Annotated[str, StringConstraints(max_length=200, pattern=_NO_NUL)]
Description = Annotated[str, StringConstraints(max_length=2000, pattern=_NO_NUL)]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=_NO_NUL)]

# Bounds beyond which a number means nothing for a privacy budget (and would only
# stress the arithmetic): refused with a 422 rather than computed.
MAX_EPSILON = 1e4
MAX_STEPS = 10**9
# Ledger seqs are 32-bit integer columns: a larger one cannot exist (PostgreSQL refuses to compare
# against it, SQLite overflows on it), so it is refused like any other invalid number.
MAX_SEQ = 2**31 - 1
# A batch: at most this many releases (or noisy_argmax histograms) in one request, and at
# most this many numbers in all (as one release's values).
MAX_BATCH = 10_000
MAX_NUMBERS = 100_000


class Request(BaseModel):
    """Every request body: unknown fields and NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Public(BaseModel):
    """Every response body."""

    model_config = ConfigDict(from_attributes=True)


# An explicit share of δ: an integer or a fraction "num/den" (or a decimal), kept exact.
Weight = Annotated[str, StringConstraints(max_length=64, pattern=r"^[0-9]+(/[0-9]+|\.[0-9]+)?$")]


class FirstAdmissionShares(Request):
    """19/20 of δ on the order where a history shaped like the dataset's first admitted request
    converts best when it reaches the cap, 1/20 spread thin; fixed by that first admission
    (the profile used when none is given)."""

    profile: Literal["first_admission"]


class DefaultShares(Request):
    """Fixed at creation: 17/20 of δ on the order where a Gaussian-shaped history reaching the
    cap converts best, a band below it for DP-SGD runs that bend, the rest thin (needs a cap
    above 0)."""

    profile: Literal["default"]


class UniformShares(Request):
    """δ/|Λ| on every order (and the pure-ε sum member)."""

    profile: Literal["uniform"]


class DpSgdShares(Request):
    """The default split with its heavy order placed for a planned DP-SGD run."""

    profile: Literal["dp_sgd"]
    sample_rate: Real = Field(ge=MIN_PROBABILITY, le=1, description="The run's sample rate q.")
    steps: Count = Field(ge=1, le=MAX_STEPS, description="The run's steps, all epochs.")


class ExplicitShares(Request):
    """Your orders and their shares of δ (the shares sum to at most 1)."""

    profile: Literal["explicit"]
    orders: list[Annotated[Real, Field(gt=1, le=10_000)]] = Field(
        min_length=1, max_length=256, description="Distinct orders α > 1."
    )
    weights: list[Weight] = Field(
        min_length=1, max_length=256, description="One share of δ per order; sum ≤ 1."
    )


# How δ is shared among the filter's members; fixed once (at creation, or by the dataset's
# first admission for first_admission), kept by cap changes.
SharesCreate = Annotated[
    FirstAdmissionShares | DefaultShares | UniformShares | DpSgdShares | ExplicitShares,
    Field(discriminator="profile"),
]


class DatasetCreate(Request):
    id: DatasetId = Field(description="1–64 characters: letters, digits, '.', '_', '-'.")
    epsilon_cap: Real = Field(ge=0, le=MAX_EPSILON)
    delta: Real = Field(ge=MIN_PROBABILITY, lt=1, description="Fixed at creation.")
    description: Description = ""
    shares: SharesCreate | None = Field(
        None, description="The filter's shares of δ (first_admission when absent)."
    )


class DatasetUpdate(Request):
    epsilon_cap: Real | None = Field(None, ge=0, le=MAX_EPSILON)
    frozen: StrictBool | None = None
    description: Description | None = None
    reason: Reason | None = None


class SharesPublic(Public):
    """The filter's members: an RDP member per order with a share of δ, and the pure sum."""

    profile: Literal["first_admission", "default", "dp_sgd", "uniform", "explicit"]
    orders: list[float] = Field(description="The dataset's order grid Λ.")
    weights: list[str] = Field(
        description='Each order\'s share of δ, exact ("num/den"); empty while a '
        "first_admission dataset has admitted nothing (its first admission fixes them)."
    )
    pure_sum: bool = Field(
        description="Whether the filter has the pure-ε sum member (basic composition, share "
        "0); false only for datasets created before it existed."
    )
    plan: dict[str, Any] | None = Field(
        None, description="dp_sgd: the planned run shape the heavy order was placed for."
    )
    fixed_at_seq: int | None = Field(
        None,
        description="first_admission: the ledger entry whose admission fixed the shares (it "
        "records them); null until then, and for the other profiles (fixed at creation).",
    )


class DecidedByPublic(Public):
    """The member that gives the dataset's spent ε now."""

    member: Literal["rdp", "pure_sum"]
    order: float | None = Field(description="The RDP member's order α (null for pure_sum).")
    share: str = Field(description="Its share of δ, exact.")
    delta: float = Field(description="Its δ (share × the dataset's δ).")
    text: str = Field(description="One sentence for a trainer.")


class OutsideGuaranteePublic(Public):
    """From this entry on, the dataset's figures are outside the filter's guarantee."""

    since_seq: int
    reason: str


class DatasetPublic(Public):
    id: str
    description: str
    epsilon_cap: float
    delta: float
    epsilon_spent: float = Field(description="Filter ε of posted charges.")
    epsilon_reserved: float = Field(description="Filter ε of posted charges plus pending holds.")
    epsilon_remaining: float
    frozen: bool
    ledger_seq: int
    active_runs: int
    created_at: Timestamp
    updated_at: Timestamp
    shares: SharesPublic
    epsilon_decided_by: DecidedByPublic | None = Field(
        description="Which member gives epsilon_spent now (null while nothing is spent)."
    )
    outside_guarantee: OutsideGuaranteePublic | None = Field(
        description="Set once a refund or a cap raised after charges put the figures outside "
        "the filter's guarantee (null while they are within it)."
    )


class EffectPublic(Public):
    """How far this admission's ledger entry moved the dataset's reported ε."""

    epsilon: float | None = Field(description="The entry's own ε at the dataset's δ.")
    epsilon_spent_before: float
    epsilon_spent_after: float
    epsilon_reserved_before: float
    epsilon_reserved_after: float


class RunCreate(Request):
    sample_rate: Real = Field(ge=MIN_PROBABILITY, le=1)
    steps_per_epoch: Count = Field(ge=1, le=10_000_000)
    epochs: Count = Field(ge=1, le=100_000)
    target_epsilon: Real | None = Field(None, gt=0, le=MAX_EPSILON)
    noise_multiplier: Real | None = Field(None, gt=0, le=1e6)
    sampling: Sampling = "poisson"
    max_grad_norm: Real | None = Field(None, gt=0, le=1e12)
    name: Name | None = None
    lease_seconds: (
        Annotated[int, Field(ge=1, le=7 * 24 * 3600), BeforeValidator(_json_integer)] | None
    ) = None
    fit_remaining: StrictBool | None = Field(
        None,
        description="true: the smallest σ (1e-5 relative) with which the whole plan fits what "
        "remains of the dataset now, holds included.",
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> RunCreate:
        sources = (self.target_epsilon, self.noise_multiplier, self.fit_remaining or None)
        if sum(source is not None for source in sources) != 1:
            raise ValueError(
                "give exactly one of target_epsilon, noise_multiplier and fit_remaining: true"
            )
        if self.steps_per_epoch * self.epochs > MAX_STEPS:
            raise ValueError(f"steps_per_epoch × epochs must be at most {MAX_STEPS}")
        return self


class RunPublic(Public):
    id: str
    dataset_id: str
    name: str | None
    status: RunStatus
    sampling: Sampling
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    epochs_charged: int
    noise_multiplier: float
    max_grad_norm: float | None
    target_epsilon: float | None
    epsilon: float = Field(description="The plan's own ε at the dataset's δ (not a filter figure).")
    epsilon_per_epoch: float
    # Not required: an Idempotency-Key replay answers the stored body, and plans stored before
    # this field existed answer without it.
    epsilon_pld: float | None = Field(
        None,
        description=(
            "This run alone, not adaptive: the PLD ε of the whole plan at the dataset's δ (what "
            "Opacus' PRV accountant shows); never used for the cap. Null when not computed yet "
            "or refused: see epsilon_pld_note."
        ),
    )
    epsilon_pld_note: str | None = Field(
        None,
        description="Why epsilon_pld is null (pending, or why the PLD accountant refused); "
        "null when it has a value.",
    )
    lease_seconds: int
    expires_at: Timestamp
    created_at: Timestamp
    updated_at: Timestamp


class RunWithDataset(RunPublic):
    dataset: DatasetPublic
    effect: EffectPublic | None = Field(
        None, description="How far this call's ledger entry moved the dataset's ε."
    )


class EpochPublic(Public):
    run_id: str
    epoch: int = Field(description="1-based.")
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float | None
    sampling: Sampling
    beyond_plan: bool
    ledger_seq: int
    expires_at: Timestamp
    dataset: DatasetPublic
    effect: EffectPublic = Field(description="How far this epoch moved the dataset's ε.")


def _json_integer_rows(value: Any) -> Any:
    """`_json_integer` for every count of a vote matrix, in one pass (a validator per count
    would cost a Python call each: 1,000 for a batch of 100 ten-class histograms)."""
    if isinstance(value, list):
        for k, row in enumerate(value):
            if isinstance(row, list):
                for c, count in enumerate(row):
                    if type(count) is not int:  # the common case costs one type check
                        try:
                            _json_integer(count)
                        except ValueError as exc:
                            raise ValueError(f"votes[{k}][{c}] {exc}") from None
    return value


# A vote count: a JSON integer (3 and 3.0 alike, as JSON Schema's `integer`; no booleans, no
# strings, no 3.5): lax int bounds each count, `_json_integer_rows` refuses the rest.
VoteCount = Annotated[int, Field(ge=0, le=1_000_000)]
# Fields only a noisy_argmax query takes, and those it does not.
_ARGMAX_ONLY = ("teachers", "votes")
_NOT_ARGMAX = ("sensitivity", "values", "batch", "count")


class ReleaseCreate(Request):
    mechanism: Mechanism = Field(
        description="`noisy_argmax`: K private predictions (GNMax) from `teachers` and "
        "`votes`, answered as `labels` only; the others: a noisy release of numbers."
    )
    sensitivity: Real = Field(1.0, gt=0, le=1e12)
    epsilon: Real | None = Field(None, gt=0, le=MAX_EPSILON)
    delta: Real | None = Field(None, ge=MIN_PROBABILITY, lt=1)
    noise_scale: Real | None = Field(None, gt=0, le=1e15)
    values: list[Annotated[Real, Field(ge=-1e300, le=1e300)]] | None = Field(
        None, min_length=1, max_length=MAX_NUMBERS
    )
    count: Count = Field(
        1,
        ge=1,
        le=MAX_BATCH,
        description="K identical releases whose noise you add: one admission, one ledger "
        "entry, exactly K times one release's cost (all or nothing).",
    )
    batch: list[list[Annotated[Real, Field(ge=-1e300, le=1e300)]]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BATCH,
        description="K value vectors of one length, each noised as its own release (instead "
        "of `values`): one admission, one ledger entry, K times one release's cost.",
    )
    teachers: Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_json_integer)] | None = (
        Field(
            None,
            description="noisy_argmax: N, the teachers, each trained on its own disjoint part "
            "of the dataset; each histogram's votes sum to at most N.",
        )
    )
    votes: Annotated[
        list[Annotated[list[VoteCount], Field(min_length=2, max_length=1_000)]] | None,
        BeforeValidator(_json_integer_rows),
    ] = Field(
        None,
        min_length=1,
        max_length=MAX_BATCH,
        description="noisy_argmax: K histograms of one length C (2 to 1,000 classes, "
        "100,000 counts in all); votes[k][c] is how many teachers gave query k label c. "
        "With `epsilon` (and `delta`) per query, or `noise_scale`: the std of the noise "
        "on each count.",
    )
    name: Name | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseCreate:
        if self.mechanism == "noisy_argmax":
            return self._argmax()
        given = [field for field in _ARGMAX_ONLY if getattr(self, field) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for a noisy_argmax query")
        # A Laplace release's ε is sensitivity / noise_scale: held to the bound a given ε has
        # (far past it the quotient overflows to inf, which no answer can carry).
        scale = self.noise_scale
        if (
            self.mechanism == "laplace"
            and scale is not None
            and self.sensitivity / scale > MAX_EPSILON
        ):
            raise ValueError(
                f"a Laplace release's ε (sensitivity / noise_scale) must be at most {MAX_EPSILON:g}"
            )
        if self.batch is not None:
            if self.values is not None:
                raise ValueError("give values (one release) or batch (several), not both")
            lengths = {len(vector) for vector in self.batch}
            if len(lengths) > 1 or 0 in lengths:
                raise ValueError("the vectors of a batch must all hold the same number (≥ 1)")
            if len(self.batch) * lengths.pop() > MAX_NUMBERS:
                raise ValueError(f"a batch may hold at most {MAX_NUMBERS:,} values in all")
        if self.count != 1 and (self.values is not None or self.batch is not None):
            raise ValueError("count is for releases whose noise you add; with values use batch")
        return self

    def _argmax(self) -> ReleaseCreate:
        misplaced = [field for field in _NOT_ARGMAX if field in self.model_fields_set]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: not for a noisy_argmax query")
        if self.teachers is None or self.votes is None:
            raise ValueError("a noisy_argmax query needs teachers and votes")
        if (self.epsilon is None) == (self.noise_scale is None):
            raise ValueError("give exactly one of epsilon and noise_scale")
        if self.epsilon is not None and self.delta is None:
            raise ValueError("a noisy_argmax query with epsilon needs delta")
        if self.noise_scale is not None and not 0.1 <= self.noise_scale <= 1e6:
            raise ValueError(
                "a noisy_argmax noise_scale must be from 0.1 to 1e6 (below 0.1 the noise on "
                "integer counts is almost surely 0)"
            )
        classes = len(self.votes[0])
        if any(len(histogram) != classes for histogram in self.votes):
            raise ValueError("every histogram of votes must have the same number of classes")
        if len(self.votes) * classes > MAX_NUMBERS:
            raise ValueError(f"votes may hold at most {MAX_NUMBERS:,} counts in all")
        return self


class NoisePublic(Public):
    """How the service noised the values: exact discrete noise on a power-of-two grid."""

    distribution: Literal["discrete_laplace", "discrete_gaussian"] = Field(
        description="Exact integer noise on the grid (Canonne, Kamath & Steinke 2020), "
        "drawn from the operating system's CSPRNG."
    )
    grid: float = Field(description="Each value was rounded to a multiple of this power of two.")
    rounding: str = Field(description="How values were rounded to the grid.")
    sensitivity_after_rounding: float = Field(
        description="The rounded values' sensitivity (L1 for Laplace, L2 for Gaussian) that the "
        "charge uses; at least the declared one."
    )
    noise_scale: float = Field(description="The noise's scale in value units (Laplace b, std σ).")
    largest_value: float = Field(
        description="The largest |value| this grid carries exactly (2^52 grid steps); larger "
        "values are refused."
    )
    exact_parameter: str = Field(
        description="The noise's exact parameter in grid steps, as 'numerator/denominator': the "
        "discrete Laplace's scale, or the discrete Gaussian's variance σ²/grid²."
    )


class ReleasePublic(Public):
    id: str
    dataset_id: str
    mechanism: Mechanism
    sensitivity: float
    noise_scale: float | None
    epsilon: float
    delta: float | None
    name: str | None
    ledger_seq: int
    noised_values: list[float] | None
    noise: NoisePublic | None = Field(
        description="Present when the service added the noise (the request had `values`, "
        "`batch` or `votes`): how it was drawn, never the draws."
    )
    count: int = Field(1, description="K: the releases (or queries) this one entry charged.")
    noised_batch: list[list[float]] | None = Field(
        None, description="With `batch`: each vector, noised."
    )
    labels: list[int] | None = Field(
        None,
        description="noisy_argmax: the winning label of each histogram (ties to the smallest "
        "label). The only output: the counts and the noise are never answered nor stored.",
    )
    created_at: Timestamp
    dataset: DatasetPublic
    effect: EffectPublic = Field(description="How far this release moved the dataset's ε.")


class EntryPublic(Public):
    seq: int
    dataset_id: str
    kind: EntryKind
    run_id: str | None
    release_id: str | None
    voids_seq: int | None
    mechanism: dict[str, Any] | None
    units: list[int] | None = Field(description="The entry's RDP curve in units of 2^-60.")
    actor: str = Field(
        description="The id of the key that wrote the entry (or `bootstrap`, `system`)."
    )
    actor_name: str | None = Field(
        description="The actor key's name when the entry was written; null for an unnamed key "
        "and for entries written before names were recorded."
    )
    actor_role: Literal["admin", "trainer", "auditor", "system"] | None = Field(
        description="The actor key's role when the entry was written (`system`: the service "
        "itself); null for entries written before roles were recorded."
    )
    idempotency_key: str | None
    epsilon: float | None = Field(description="The entry's own ε at the dataset's δ.")
    pure: str | None = Field(
        None,
        description='The entry\'s exact pure-ε part ("num/den", then ";k" for k non-pure '
        "mechanisms); absent on datasets without the pure-sum member and before it existed.",
    )
    epsilon_spent_before: float | None = Field(
        None, description="The dataset's spent ε before this entry (absent on older entries)."
    )
    epsilon_spent_after: float
    epsilon_reserved_before: float | None = Field(
        None, description="The dataset's reserved ε before this entry (absent on older entries)."
    )
    epsilon_reserved_after: float
    details: dict[str, Any]
    created_at: Timestamp
    prev_hash: str
    hash: str


class VoidCreate(Request):
    reason: Reason
    refund: StrictBool = Field(
        False,
        description="false (default): the charge's cost is kept (its output was handed out). "
        "true: subtract it, admitting that budget again; the dataset is then outside the "
        "filter's guarantee and says so.",
    )


class VerifyPublic(Public):
    ok: bool
    entries: int
    last_seq: int
    last_hash: str
    chain_ok: bool
    replay_ok: bool
    problems: list[str]
    outside_guarantee: OutsideGuaranteePublic | None = Field(
        description="Where the replayed ledger leaves the filter's guarantee (null: nowhere)."
    )


class KeyCreate(Request):
    role: Role
    datasets: list[DatasetId] | None = Field(None, max_length=1000)
    name: Name | None = None

    @model_validator(mode="after")
    def _scope_only_below_admin(self) -> KeyCreate:
        # An admin may do everything, issuing itself an unscoped key included: a scope on an
        # admin key would mean nothing, so only trainer and auditor keys take one.
        if self.role == "admin" and self.datasets is not None:
            raise ValueError("admin keys cannot be scoped: only trainer and auditor keys can")
        return self


class KeyPublic(Public):
    id: str
    role: Role
    datasets: list[str] | None
    name: str | None
    created_at: Timestamp
    revoked_at: Timestamp | None


class KeyCreated(KeyPublic):
    key: str = Field(description="The bearer key: shown once, never stored.")


class EpsilonRequest(Request):
    sample_rate: Real = Field(ge=MIN_PROBABILITY, le=1)
    noise_multiplier: Real = Field(gt=0, le=1e6)
    steps: Count = Field(ge=1, le=MAX_STEPS)
    delta: Real = Field(ge=MIN_PROBABILITY, lt=1)


class EpsilonPublic(Public):
    epsilon: float


class NoiseMultiplierRequest(Request):
    sample_rate: Real = Field(ge=MIN_PROBABILITY, le=1)
    steps: Count = Field(ge=1, le=MAX_STEPS)
    target_epsilon: Real = Field(gt=0, le=MAX_EPSILON)
    delta: Real = Field(ge=MIN_PROBABILITY, lt=1)


class NoiseMultiplierPublic(Public):
    noise_multiplier: float
    epsilon: float


class Problem(Public):
    """An RFC 9457 problem: every error answer is one, with a stable `code`.

    Extension members (RFC 9457 §3.2) may follow; the codes that always carry some have their
    own schema below, which clients may try first.
    """

    type: str = Field(description="`urn:privacy-ledger:problem:` followed by the code.")
    title: str
    status: int = Field(ge=100, le=599)
    detail: str
    code: str = Field(description="Stable: clients branch on this, never on `detail`.")


class ValidationIssue(Public):
    """One reason a request is invalid."""

    loc: list[str | int] = Field(description="Where: `body`, `query`, `path` and the field names.")
    msg: str
    type: str | None


class ValidationProblem(Problem):
    """422 `validation_error`: the request is invalid, and `errors` says where and why."""

    code: Literal["validation_error"]
    errors: list[ValidationIssue] = Field(min_length=1)


class BudgetExhaustedProblem(Problem):
    """409 `budget_exhausted`: the cap filter refused; the numbers say why."""

    code: Literal["budget_exhausted"]
    epsilon_cap: float
    epsilon_spent: float = Field(description="Filter ε of posted charges when refused.")
    epsilon_reserved: float = Field(description="Filter ε of charges plus holds when refused.")
    epsilon_requested: float = Field(description="The request's own ε at the dataset's δ.")
    epsilon_after: float = Field(description="The filter ε the dataset would have reached.")


class RunNotActiveProblem(Problem):
    """409 `run_not_active`: the run is completed, aborted or expired."""

    code: Literal["run_not_active"]
    run_status: RunStatus


class IdempotencyConflictProblem(Problem):
    """422 `idempotency_conflict`: the Idempotency-Key was used before for another request."""

    code: Literal["idempotency_conflict"]
    idempotency_key: str


# The problems that carry extension members, by status: a status's answer is one of these or a
# plain `Problem` (listed last: it matches every problem, so a client tries the others first).
PROBLEM_SUBTYPES: dict[int, tuple[type[Problem], ...]] = {
    409: (BudgetExhaustedProblem, RunNotActiveProblem),
    422: (ValidationProblem, IdempotencyConflictProblem),
}


class DryRunRefused(Public):
    """A dry run the real call would refuse: only its refusal."""

    dry_run: Literal[True]
    admitted: Literal[False]
    refusal: Problem = Field(description="The problem the real call would answer.")


# An admitted dry run answers the body the real call would, with nothing written: the ids of
# what would have been written are null, and noise is neither drawn nor added.
# (Pydantic replaces an overridden field; mypy reads the override as a Liskov violation.)
class RunDryRun(RunWithDataset):
    """An admitted dry run of a run plan."""

    id: None  # type: ignore[assignment]
    dry_run: Literal[True]
    admitted: Literal[True]


class EpochDryRun(EpochPublic):
    """An admitted dry run of an epoch reservation."""

    ledger_seq: None  # type: ignore[assignment]
    dry_run: Literal[True]
    admitted: Literal[True]


class ReleaseDryRun(ReleasePublic):
    """An admitted dry run of a release."""

    id: None  # type: ignore[assignment]
    ledger_seq: None  # type: ignore[assignment]
    noised_values: None
    noised_batch: None = None
    labels: None = None
    dry_run: Literal[True]
    admitted: Literal[True]


# What every route that takes a JSON body may also answer: not JSON (400), too large (413),
# not application/json (415), invalid (422).
_BODY_STATUSES = (400, 413, 415, 422)


def _problem_schema(status: int) -> dict[str, Any]:
    """The schema of one status's problem answers: a reference to the named component(s)."""
    refs = [
        {"$ref": f"#/components/schemas/{m.__name__}"} for m in PROBLEM_SUBTYPES.get(status, ())
    ]
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    return {"anyOf": [*refs, problem_ref]} if refs else problem_ref


def problems(*statuses: int, body: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting problem+json answers for these statuses, and for 503
    (with `body`, for the statuses of a bad JSON body too).

    Every route that uses this authenticates its caller against the database, so any of
    them answers 503 `service_unavailable` while the database is unreachable.
    """
    # Not `{"model": Problem}`: FastAPI would document that under the route's own media type
    # (application/json), while every error is sent as application/problem+json. The schemas
    # are references to named components (the openapi hook in service/api/openapi.py publishes
    # them), so a generator builds one model per problem, not one per operation and status.
    every = {*statuses, 503, *(_BODY_STATUSES if body else ())}
    return {
        status: {
            "description": PROBLEM_DESCRIPTIONS.get(status, "A problem."),
            "content": {"application/problem+json": {"schema": _problem_schema(status)}},
        }
        for status in sorted(every)
    }


PROBLEM_DESCRIPTIONS = {
    400: "`malformed_request`: the body is not JSON.",
    401: "`unauthorized`: no key, an unknown key or a revoked key.",
    403: "`forbidden`: the key's role may not do this.",
    404: "`not_found`: no such resource, or not in the key's scope.",
    409: "`budget_exhausted`, `dataset_frozen`, `run_not_active` or `conflict`.",
    413: "`payload_too_large`.",
    415: "`unsupported_media_type`: send application/json.",
    422: "`validation_error` (with `errors`) or `idempotency_conflict`.",
    503: "`service_unavailable`: the database is unreachable; retry.",
}


class DatasetPage(Public):
    data: list[DatasetPublic]
    has_more: bool


class RunPage(Public):
    data: list[RunPublic]
    has_more: bool


class EntryPage(Public):
    data: list[EntryPublic]
    has_more: bool


class KeyPage(Public):
    data: list[KeyPublic]
    has_more: bool


def dry_run_answers(admitted: type[Public]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route's ``dry_run=true`` 200: `admitted`, or the refusal."""
    return {200: {"model": admitted | DryRunRefused, "description": "A dry run's answer."}}


# The answers routes document, defined once: every route that reads or acts on a resource
# (no key, wrong role, not found or out of scope, bad parameters); each dry run's 200.
READ_ERRORS = problems(401, 403, 404, 422)
RUN_DRY_RUN = dry_run_answers(RunDryRun)
EPOCH_DRY_RUN = dry_run_answers(EpochDryRun)
RELEASE_DRY_RUN = dry_run_answers(ReleaseDryRun)
