"""The client's exceptions: one tree under `LedgerError`, chosen by the problem's `code`.

The service answers every error with RFC 9457 problem+json carrying a stable
`code` (see docs/api.md). The client maps that code to one class, so callers
can write ``except BudgetExhausted`` instead of comparing strings:

    LedgerError
    ├── BudgetExhausted          409 budget_exhausted
    ├── AuthError                401/403
    │   ├── Unauthorized         401 unauthorized
    │   └── Forbidden            403 forbidden
    ├── NotFound                 404 not_found
    ├── IdempotencyConflict      422 idempotency_conflict
    ├── BadRequest               400 malformed_request, 413, 415
    │   └── ValidationError      422 validation_error
    ├── Conflict                 409 conflict
    │   ├── RunNotActive         409 run_not_active
    │   └── DatasetFrozen        409 dataset_frozen
    ├── ServerError              5xx, after the retries
    └── TransportError           no answer (connection, timeout), after the retries
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AuthError",
    "BadRequest",
    "BudgetExhausted",
    "Conflict",
    "DatasetFrozen",
    "Forbidden",
    "IdempotencyConflict",
    "LedgerError",
    "NotFound",
    "RunNotActive",
    "ServerError",
    "TransportError",
    "Unauthorized",
    "ValidationError",
    "error_from_problem",
]


class LedgerError(Exception):
    """Base of every error the client raises.

    `status` is the HTTP status (None when no answer came back), `code` the
    problem's stable code, `detail` its human-readable explanation and
    `problem` the whole problem body as the service sent it.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        problem: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail
        self.problem: dict[str, Any] = dict(problem or {})
        self.request_id = request_id

    def _number(self, name: str) -> float | None:
        value = self.problem.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None


class BudgetExhausted(LedgerError):
    """The dataset's cap filter refused the request (409 ``budget_exhausted``)."""

    @property
    def epsilon_cap(self) -> float | None:
        """The dataset's ε cap."""
        return self._number("epsilon_cap")

    @property
    def epsilon_spent(self) -> float | None:
        """The dataset's ε of posted charges when the request was refused."""
        return self._number("epsilon_spent")

    @property
    def epsilon_reserved(self) -> float | None:
        """The dataset's ε of charges plus holds when the request was refused."""
        return self._number("epsilon_reserved")

    @property
    def epsilon_requested(self) -> float | None:
        """The refused request's own ε at the dataset's δ."""
        return self._number("epsilon_requested")

    @property
    def epsilon_after(self) -> float | None:
        """The filter ε the dataset would have reached had the request been admitted."""
        return self._number("epsilon_after")

    @property
    def noise_multiplier_that_fits(self) -> float | None:
        """For a refused run plan: the smallest σ with which it would fit now (else None)."""
        return self._number("noise_multiplier_that_fits")


class AuthError(LedgerError):
    """The key was not accepted (401) or lacks the role for this call (403)."""


class Unauthorized(AuthError):
    """No key, an unknown key or a revoked key (401 ``unauthorized``)."""


class Forbidden(AuthError):
    """A valid key without the role for this operation (403 ``forbidden``)."""


class NotFound(LedgerError):
    """No such dataset, run or entry, or not visible to this key (404 ``not_found``)."""


class IdempotencyConflict(LedgerError):
    """The Idempotency-Key was used before for a different request (422)."""


class BadRequest(LedgerError):
    """The service could not accept the request as sent (400, 413, 415)."""


class ValidationError(BadRequest):
    """The request's fields were rejected (422 ``validation_error``).

    `errors` lists ``{"loc": [...], "msg": "..."}`` items, one per problem.
    """

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The service's list of field errors."""
        items = self.problem.get("errors")
        if not isinstance(items, list):
            return []
        return [dict(item) for item in items if isinstance(item, Mapping)]


class Conflict(LedgerError):
    """The request conflicts with the current state (409 ``conflict`` and others)."""


class RunNotActive(Conflict):
    """The run is completed, aborted or expired (409 ``run_not_active``)."""


class DatasetFrozen(Conflict):
    """An admin froze the dataset; nothing is charged until it is unfrozen (409)."""


class ServerError(LedgerError):
    """The service failed (5xx) on every attempt; `attempts` says how many were made."""

    def __init__(self, message: str, *, attempts: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.attempts = attempts


class TransportError(LedgerError):
    """No answer from the service (connection refused or dropped, timeout) after the retries.

    The original httpx exception is the ``__cause__``. For a POST the outcome is
    unknown: retry it with the same `idempotency_key` to learn it without a
    second charge.
    """

    def __init__(self, message: str, *, attempts: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.attempts = attempts


_BY_CODE: dict[str, type[LedgerError]] = {
    "budget_exhausted": BudgetExhausted,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "idempotency_conflict": IdempotencyConflict,
    "validation_error": ValidationError,
    "malformed_request": BadRequest,
    "unsupported_media_type": BadRequest,
    "payload_too_large": BadRequest,
    "conflict": Conflict,
    "run_not_active": RunNotActive,
    "dataset_frozen": DatasetFrozen,
    "service_unavailable": ServerError,
    "internal_error": ServerError,
}

_BY_STATUS: dict[int, type[LedgerError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: BadRequest,
    415: BadRequest,
    422: ValidationError,
}


def error_from_problem(
    status: int,
    problem: Mapping[str, Any],
    *,
    request_id: str | None = None,
    attempts: int = 1,
) -> LedgerError:
    """The exception for an error answer: by the problem's `code`, else by HTTP status."""
    code = problem.get("code")
    code = code if isinstance(code, str) else None
    cls = _BY_CODE.get(code or "")
    if cls is None:
        cls = ServerError if status >= 500 else _BY_STATUS.get(status, LedgerError)
    detail = problem.get("detail")
    detail = detail if isinstance(detail, str) else None
    title = problem.get("title")
    title = title if isinstance(title, str) else None
    message = f"{status} {code or 'error'}: {detail or title or 'no detail given'}"
    if cls is ServerError:
        return ServerError(
            message,
            attempts=attempts,
            status=status,
            code=code,
            detail=detail,
            problem=problem,
            request_id=request_id,
        )
    return cls(
        message, status=status, code=code, detail=detail, problem=problem, request_id=request_id
    )
