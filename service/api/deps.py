"""Dependency aliases, in one place: the database, the caller, idempotency and paging."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
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


def _current_key(
    db: DatabaseDep,
    settings: SettingsDep,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    token = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    principal = keys.authenticate(db, token, settings.admin_key)
    request.state.key_id = principal.id
    return principal


CurrentKey = Annotated[Principal, Depends(_current_key)]

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
