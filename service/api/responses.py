"""Outcomes of domain operations → HTTP responses."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from service.api.errors import domain_problem
from service.domain.errors import DomainError
from service.domain.transactions import Outcome

DryRunOutcome = tuple[dict[str, Any] | None, DomainError | None]


def respond(outcome: Outcome | DryRunOutcome, id_fields: tuple[str, ...] = ()) -> JSONResponse:
    """The response for a write (replays marked) or for a dry run."""
    if isinstance(outcome, Outcome):
        headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
        return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)
    body, refusal = outcome
    if refusal is not None:
        return JSONResponse(
            {"dry_run": True, "admitted": False, "refusal": domain_problem(refusal)}
        )
    assert body is not None
    blanked = {**body, **{name: None for name in id_fields if name in body}}
    return JSONResponse({**blanked, "dry_run": True, "admitted": True})
