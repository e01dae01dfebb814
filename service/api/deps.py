"""Dependency aliases, in one place: the database, the caller, idempotency and paging."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from pydantic import BaseModel

from service.domain import keys
from service.domain.keys import Principal
from service.domain.transactions import HMAC_PREFIX, Idempotency
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
    """The request's idempotency scope: key holder, key and a fingerprint of the request.

    The fingerprint is an HMAC-SHA256 under the server secret: the stored record must not let
    anyone who reads the database recompute it from guessed bodies (a released count is
    found from an unkeyed hash in under a second). The unkeyed SHA-256 that records written
    before carry is computed too, over the same bytes, only to compare with those records.
    """
    if key is None:
        return None
    fingerprint: dict[str, Any] = {
        "method": request.method,
        "path": request.url.path,
        "query": sorted(request.query_params.multi_items()),
        "body": body.model_dump(mode="json") if body is not None else None,
    }
    canonical = json.dumps(fingerprint, sort_keys=True).encode()
    secret: bytes = request.app.state.fingerprint_key
    # base64url without padding: prefix + 43 characters fit the 64-character column.
    mac = hmac.new(secret, canonical, hashlib.sha256).digest()
    keyed = HMAC_PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    return Idempotency(principal.id, key, keyed, hashlib.sha256(canonical).hexdigest())
