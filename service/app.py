"""The FastAPI application: routers, error handlers, request guards."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service import secret_key
from service.api import errors, openapi, render
from service.api.errors import problem
from service.api.lane import AdmissionLane, replaying
from service.api.routes import accountant, datasets, health, keys, ledger, releases, runs
from service.domain.keys import KeyCache
from service.domain.pipeline import Pipeline
from service.observability import RequestContext, configure_logging
from service.settings import Settings, get_settings
from service.storage.database import Database
from service.ui.routes import router as ui_router

DESCRIPTION = """
A central ledger for differential-privacy budgets. Trainers reserve budget before
every DP-SGD epoch and every noisy release and get back the noise to use; auditors
read a hash-chained ledger per dataset; admins set caps and keys.

Errors are RFC 9457 `application/problem+json` with a stable `code`. Every POST
accepts `Idempotency-Key`.
"""

_BODY_METHODS = {b"POST", b"PUT", b"PATCH"}


class RequestGuard:
    """Refuse oversized (413) and non-JSON (415) bodies, and NUL in paths or queries, up front."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # No resource id or query value can hold a NUL (PostgreSQL cannot even store one):
        # a path with one names nothing, a query with one is invalid — before any database sees it.
        if "\x00" in scope["path"]:
            await problem(404, "not_found", "Not found", "no such resource")(scope, receive, send)
            return
        if b"%00" in scope["query_string"] or b"\x00" in scope["query_string"]:
            detail = "query parameters must not contain NUL characters"
            await problem(422, "validation_error", "Invalid request", detail)(scope, receive, send)
            return
        if scope["method"].encode() not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
        if length is not None and not length.isdigit():
            await problem(400, "malformed_request", "Malformed request", "bad Content-Length")(
                scope, receive, send
            )
            return
        if length is not None and int(length) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        has_body = chunked or (length is not None and int(length) > 0)
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if has_body and media != b"application/json" and not media.endswith(b"+json"):
            await problem(
                415,
                "unsupported_media_type",
                "Unsupported media type",
                "send request bodies as application/json",
            )(scope, receive, send)
            return
        if length is None and chunked:
            # No length to check up front: read the body here (up to the limit) and
            # replay it, so an oversized stream is a clean 413, not a parse error.
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    await self._too_large(scope, receive, send)
                    return
                if not message.get("more_body", False):
                    break
            await self.app(scope, replaying(bytes(body), receive), send)
            return
        await self.app(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request bodies are limited to {self.max_body_bytes} bytes"
        await problem(413, "payload_too_large", "Payload too large", detail)(scope, receive, send)


# Young-generation threshold (CPython's default is 700): docs/operations.md, "Garbage collection".
GC_YOUNG_THRESHOLD = 10_000


def served_app() -> FastAPI:
    """The application of a served process (`privacy-ledger serve` has uvicorn call this in
    every worker): `create_app()` after `tune_garbage_collector()`. Tests and in-process
    callers build theirs with `create_app` and keep the interpreter's collector as it is."""
    tune_garbage_collector()
    return create_app()


def tune_garbage_collector() -> None:
    """Keep CPython's cyclic collector out of the admission path of a served process.

    Under load the default collector ran ~100 young and ~8 full collections a second per
    worker, 1.3 s of every 10 with the GIL held (a full one took ~130 ms, scanning every
    object the imports and the app made), and a pause that falls while a batch holds its
    dataset's lock holds up every process. So: collect once, then freeze what exists
    (start-up objects live for the process; they are never scanned again, and reference
    counting still frees them), and collect the young generation every 10,000 net
    allocations rather than 700 (the older generations keep their ratios, so cycles are still
    collected). bench/inference.py: 0.15–0.2 s of collection per 10 s per worker, not 1.3 s.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def create_app(
    settings: Settings | None = None,
    database: Database | None = None,
    *,
    admission_lane: bool = True,
) -> FastAPI:
    """Build the application (`served_app` builds it in every worker of a served process).

    `admission_lane=False` leaves every request to FastAPI (the lane's tests compare the two).
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if database is None:
            app.state.db.dispose()

    app = FastAPI(
        title="privacy-ledger",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    # Loaded (or created) before serving anything: a bad key file stops the worker here.
    app.state.fingerprint_key = secret_key.load(settings)
    app.state.db = database or Database(settings.database_url)
    # Every write goes through it; it records answers for replays as the routes render them.
    app.state.pipeline = Pipeline(app.state.db, render.recorded)
    # Per process (every uvicorn worker builds its own app): the revocation bound is its TTL.
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    errors.install(app)
    openapi.install(app)
    for module in (health, datasets, runs, releases, ledger, keys, accountant):
        app.include_router(module.router)
    app.include_router(ui_router)
    if admission_lane:  # innermost of ours: the guard and the request context see its requests
        routes = [
            r for r in (*runs.router.routes, *releases.router.routes) if isinstance(r, APIRoute)
        ]
        app.add_middleware(AdmissionLane, fastapi=app, routes=routes)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext)
    configure_logging(settings.log_level)
    return app
