"""Dependency aliases, in one place: the database, the caller, idempotency and paging."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from fastapi.params import Depends as DependsParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from service.domain import keys
from service.domain.keys import Principal
from service.domain.transactions import Idempotency
from service.settings import Settings
from service.storage.database import Database


def _database(request: Request) -> Database:
    database: Database = request.app.state.db
    return database


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


DatabaseDep = Annotated[Database, Depends(_database)]
SettingsDep = Annotated[Settings, Depends(_settings)]


# Published as the `bearer` security scheme. Not `auto_error`: a missing or non-Bearer header is
# our own 401 problem (with `WWW-Authenticate: Bearer`), like an unknown or revoked key.
_bearer = HTTPBearer(
    scheme_name="bearer",
    description="An API key: `Authorization: Bearer pl_<key id>_<secret>`.",
    auto_error=False,
)


def _current_key(
    db: DatabaseDep,
    settings: SettingsDep,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    token = credentials.credentials.strip() if credentials is not None else None
    principal = keys.authenticate(db, token, settings.admin_key)
    request.state.key_id = principal.id
    return principal


CurrentKey = Annotated[Principal, Depends(_current_key)]


def requires(*roles: str) -> DependsParam:
    """A route dependency that refuses (403) keys without one of `roles` (admin always passes).

    The domain checks the role again; this only makes the refusal come first: FastAPI solves a
    route's dependencies before it validates the body, so a trainer's invalid PATCH is told it
    may not PATCH (403), not how its body is wrong (422).
    """

    def check(principal: CurrentKey) -> None:
        principal.require(*roles)

    dependency: DependsParam = Depends(check)
    return dependency


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Retry-safe key: the same key and request replay the first response.",
    ),
]
DryRun = Annotated[bool, Query(description="Answer what would happen; write nothing.")]
Limit = Annotated[int, Query(ge=1, le=1000)]


def idempotency(
    request: Request, principal: Principal, key: str | None, body: BaseModel | None
) -> Idempotency | None:
    """The request's idempotency scope: key holder, key and a fingerprint of the request."""
    if key is None:
        return None
    fingerprint: dict[str, Any] = {
        "method": request.method,
        "path": request.url.path,
        "query": sorted(request.query_params.multi_items()),
        "body": body.model_dump(mode="json") if body is not None else None,
    }
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return Idempotency(principal.id, key, digest)
