"""API keys: issue (secret shown once) and revoke (admin); list (admin, auditor)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api import render
from service.api.deps import (
    CurrentKey,
    DatabaseDep,
    IdempotencyKeyHeader,
    KeyCacheDep,
    Limit,
    PipelineDep,
    idempotency,
    requires,
)
from service.api.responses import respond
from service.api.schemas import READ_ERRORS, KeyCreate, KeyCreated, KeyPage, KeyPublic, problems
from service.domain import keys

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post(
    "",
    status_code=201,
    response_model=KeyCreated,
    operation_id="create_key",
    responses=problems(401, 403, 404, body=True),
    dependencies=[requires("admin")],
)
def create_key(
    body: KeyCreate,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Issue a key; the bearer secret is in this response only."""
    scope = idempotency(request, principal, idempotency_key, body)
    issued = keys.create(
        pipeline,
        principal,
        role=body.role,
        datasets=body.datasets,
        name=body.name,
        idempotency=scope,
    )
    return respond(issued)


@router.get("", response_model=KeyPage, operation_id="list_keys", responses=READ_ERRORS)
def list_keys(
    db: DatabaseDep, principal: CurrentKey, limit: Limit = 100, after: str | None = None
) -> KeyPage:
    """Keys in id order, never their secrets (admin, auditor).

    A scoped auditor sees the keys that may act on one of its datasets, each scope cut to its own.
    """
    shown, more = keys.list_keys(db, principal, after=after, limit=limit)
    return KeyPage.model_validate({"data": [render.shown_key(k) for k in shown], "has_more": more})


@router.delete(
    "/{key_id}", response_model=KeyPublic, operation_id="revoke_key", responses=READ_ERRORS
)
def revoke_key(
    key_id: str, pipeline: PipelineDep, cache: KeyCacheDep, principal: CurrentKey
) -> KeyPublic:
    """Revoke a key: refused from the next request on by the worker that answers, and within
    `LEDGER_KEY_CACHE_SECONDS` (default 1 s) by every other worker and process."""
    revoked = keys.revoke_key(pipeline, principal, key_id, cache)
    return KeyPublic.model_validate(render.key(revoked))
