"""Domain errors, each with a stable code; the HTTP layer alone maps them to statuses and
renders them as problem+json (`service.api.errors`)."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every refusal the domain makes on purpose."""

    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidRequest(DomainError):
    """Arguments the accountant or the domain rejects (422)."""

    code, title = "validation_error", "Invalid request"


class Unauthorized(DomainError):
    """No key, an unknown key or a revoked key."""

    code, title = "unauthorized", "Unauthorized"


class Forbidden(DomainError):
    """A valid key without the role for this operation."""

    code, title = "forbidden", "Forbidden"


class NotFound(DomainError):
    """No such resource (or not visible to this key)."""

    code, title = "not_found", "Not found"


class Conflict(DomainError):
    """The request conflicts with the current state (e.g. an id already taken)."""

    code, title = "conflict", "Conflict"


class BudgetExhausted(DomainError):
    """The cap filter refuses the request."""

    code, title = "budget_exhausted", "Budget exhausted"


class CapBelowReserved(DomainError):
    """A lower cap would not admit what the dataset has already posted and held."""

    code, title = "cap_below_reserved", "Cap below reserved budget"


class DatasetFrozen(DomainError):
    """An admin froze the dataset: nothing is charged until it is unfrozen."""

    code, title = "dataset_frozen", "Dataset frozen"


class RunNotActive(DomainError):
    """The run is completed, aborted or expired."""

    code, title = "run_not_active", "Run not active"


class IdempotencyConflict(DomainError):
    """The Idempotency-Key was used before for a different request."""

    code, title = "idempotency_conflict", "Idempotency key reused"


# Refusals a dry run answers as "not admitted" (every other error is an error of the request).
REFUSALS = (BudgetExhausted, DatasetFrozen, RunNotActive)
