"""Dependency aliases, in one place: the database, the caller, idempotency and paging.

The dependencies are `async def` where they do no I/O: FastAPI runs every plain `def`
dependency in the thread pool, a thread hop each, for nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from fastapi.params import Depends as DependsParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from service.domain import keys
from service.domain.keys import KeyCache, Principal
from service.domain.pipeline import HMAC_PREFIX, Idempotency, Pipeline
from service.settings import Settings
from service.storage.database import Database


async def _database(request: Request) -> Database:
    database: Database = request.app.state.db
    return database


async def _pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


async def _key_cache(request: Request) -> KeyCache:
    cache: KeyCache = request.app.state.key_cache
    return cache


DatabaseDep = Annotated[Database, Depends(_database)]
PipelineDep = Annotated[Pipeline, Depends(_pipeline)]
KeyCacheDep = Annotated[KeyCache, Depends(_key_cache)]


# Published as the `bearer` security scheme. Not `auto_error`: a missing or non-Bearer header is
# our own 401 problem (with `WWW-Authenticate: Bearer`), like an unknown or revoked key.
_bearer = HTTPBearer(
    scheme_name="bearer",
    description="An API key: `Authorization: Bearer pl_<key id>_<secret>`.",
    auto_error=False,
)


async def _current_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    token = credentials.credentials.strip() if credentials is not None else None
    return await principal_of(request.scope, token)


async def principal_of(scope: Scope, token: str | None) -> Principal:
    """The principal behind a request's bearer token (or Unauthorized); its key id noted in the
    request's state for the access log.

    On the event loop: a key the process's cache holds needs no database, so no thread; only
    a lookup (a key not seen within the cache's bound) goes to the thread pool. The app's
    state is read here rather than through sub-dependencies: every request solves this one.
    """
    state = scope["app"].state
    settings: Settings = state.settings
    cache: keys.KeyCache = state.key_cache
    principal = keys.recognise(token, settings.admin_key, cache)
    if principal is None:
        principal = await run_in_threadpool(
            keys.authenticate, state.db, token, settings.admin_key, cache
        )
    elif cache.claim_refresh(principal.id):
        # This request reads the key again, half a bound before its entry runs out; the
        # requests beside it go on from the cache (KeyCache, "Refresh ahead").
        principal = await run_in_threadpool(
            partial(keys.authenticate, refresh=True), state.db, token, settings.admin_key, cache
        )
    scope.setdefault("state", {})["key_id"] = principal.id
    return principal


CurrentKey = Annotated[Principal, Depends(_current_key)]


class Requires:
    """A route dependency that refuses (403) keys without one of `roles` (admin always passes).

    The domain checks the role again; this only makes the refusal come first: FastAPI solves a
    route's dependencies before it validates the body, so a trainer's invalid PATCH is told it
    may not PATCH (403), not how its body is wrong (422). A class, not a closure, so that the
    admission lane (service/api/lane.py) can read the roles of a route it serves.
    """

    def __init__(self, *roles: str) -> None:
        self.roles = roles

    async def __call__(self, principal: CurrentKey) -> None:  # no I/O: on the event loop
        principal.require(*self.roles)


def requires(*roles: str) -> DependsParam:
    """`Requires(*roles)` as a route dependency."""
    dependency: DependsParam = Depends(Requires(*roles))
    return dependency


# What the Idempotency-Key header may hold (visible ASCII, no spaces).
IDEMPOTENCY_KEY_LENGTH = (1, 255)
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]+$"
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=IDEMPOTENCY_KEY_LENGTH[0],
        max_length=IDEMPOTENCY_KEY_LENGTH[1],
        pattern=IDEMPOTENCY_KEY_PATTERN,
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
