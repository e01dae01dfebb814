"""Domain errors, each with a stable code; the HTTP layer renders them as problem+json."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every refusal the domain makes on purpose."""

    status = 400
    code = "bad_request"
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidRequest(DomainError):
    """Arguments the accountant or the domain rejects (422)."""

    status, code, title = 422, "validation_error", "Invalid request"


class Unauthorized(DomainError):
    """No key, an unknown key or a revoked key."""

    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(DomainError):
    """A valid key without the role for this operation."""

    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(DomainError):
    """No such resource (or not visible to this key)."""

    status, code, title = 404, "not_found", "Not found"


class Conflict(DomainError):
    """The request conflicts with the current state (e.g. an id already taken)."""

    status, code, title = 409, "conflict", "Conflict"


class BudgetExhausted(DomainError):
    """The cap filter refuses the request."""

    status, code, title = 409, "budget_exhausted", "Budget exhausted"


class CapBelowReserved(DomainError):
    """A lower cap would not admit what the dataset has already posted and held."""

    status, code, title = 409, "cap_below_reserved", "Cap below reserved budget"


class DatasetFrozen(DomainError):
    """An admin froze the dataset: nothing is charged until it is unfrozen."""

    status, code, title = 409, "dataset_frozen", "Dataset frozen"


class RunNotActive(DomainError):
    """The run is completed, aborted or expired."""

    status, code, title = 409, "run_not_active", "Run not active"


class IdempotencyConflict(DomainError):
    """The Idempotency-Key was used before for a different request."""

    status, code, title = 422, "idempotency_conflict", "Idempotency key reused"
