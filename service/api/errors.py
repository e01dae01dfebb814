"""One error model: RFC 9457 problem+json with a stable `code`, never a stack trace."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.domain import errors as domain
from service.domain.errors import DomainError

log = logging.getLogger("privacy_ledger")

PROBLEM_TYPE = "urn:privacy-ledger:problem:"
_HTTP_CODES = {
    400: ("malformed_request", "Malformed request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


# The HTTP status of each domain refusal (the domain itself speaks no HTTP).
_STATUSES: dict[type[DomainError], int] = {
    domain.InvalidRequest: 422,
    domain.Unauthorized: 401,
    domain.Forbidden: 403,
    domain.NotFound: 404,
    domain.Conflict: 409,
    domain.BudgetExhausted: 409,
    domain.CapBelowReserved: 409,
    domain.DatasetFrozen: 409,
    domain.RunNotActive: 409,
    domain.IdempotencyConflict: 422,
}


def status_of(error: DomainError) -> int:
    """The HTTP status of a domain refusal."""
    for kind in type(error).__mro__:
        if kind in _STATUSES:
            return _STATUSES[kind]
    return 400


def problem_body(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The problem+json document.

    Every `validation_error` carries `errors` (docs/api.md promises it): a refusal found past
    request parsing (by the domain, the database, the request guard) has one, the detail.
    """
    if code == "validation_error" and "errors" not in extra:
        extra["errors"] = [{"loc": [], "msg": detail, "type": "value_error"}]
    return {
        "type": PROBLEM_TYPE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    """A problem+json response."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        problem_body(status, code, title, detail, **extra),
        status_code=status,
        media_type="application/problem+json",
        headers=headers,
    )


def domain_problem(error: DomainError) -> dict[str, Any]:
    """The problem document of a domain refusal."""
    return problem_body(status_of(error), error.code, error.title, error.detail, **error.extra)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route allows on this path, read from the app's own OpenAPI paths."""
    app: FastAPI = request.app
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            regex = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            table.append((re.compile(f"^{regex}$"), {m.upper() for m in operations}))
        app.state.allow_table = table
    methods: set[str] = set()
    for pattern, allowed in table:
        if pattern.match(request.url.path):
            methods |= allowed
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into problem+json."""

    @app.exception_handler(DomainError)
    async def _domain(_: Request, error: DomainError) -> JSONResponse:
        return problem(status_of(error), error.code, error.title, error.detail, **error.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in error.errors()
        ]
        if any(e["type"] == "json_invalid" for e in errors):
            return problem(
                400, "malformed_request", "Malformed request", "the body is not valid JSON"
            )
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        return problem(422, "validation_error", "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code, title = _HTTP_CODES.get(error.status_code, ("http_error", "HTTP error"))
        response = problem(error.status_code, code, title, str(error.detail))
        response.headers.update(error.headers or {})
        if error.status_code == 405:
            # A 405 must list every allowed method (RFC 9110 §15.5.6); the router names only
            # the first route that matched the path, so gather them from all of them.
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(DataError)
    async def _unstorable(_: Request, error: DataError) -> JSONResponse:
        # The database refused a value of the request (PostgreSQL: a NUL character, an integer
        # past the column's range). That is bad input, not an outage: a 503 would have clients
        # retry a request that can never succeed.
        log.info("database refused a request value: %s", type(error.orig).__name__)
        return problem(
            422, "validation_error", "Invalid request", "a value in the request cannot be stored"
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database(_: Request, error: Exception) -> JSONResponse:
        log.error("database unavailable: %s", type(error).__name__)
        return problem(
            503, "service_unavailable", "Service unavailable", "the database is unavailable; retry"
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return problem(500, "internal_error", "Internal error", "an unexpected error occurred")
