"""The admission lane: the hot write routes' common case, without FastAPI's request machinery.

Under load an admission spent about as much of its worker's CPU in FastAPI's per-request
machinery — route matching over every router, dependency solving, parameter validation, the
exception and exit-stack middleware — as in its locked batch (docs/benchmarks.md, "The
admission lane"). Most of that work is the same every time: a trainer's key from the
process's cache, a path with an id, no query, a small JSON body. This ASGI layer, just inside
the request guard and the request context, serves those requests itself and hands every
other one to FastAPI as it came:

- It serves only the routes named in `LANE_OPERATIONS`, and awaits each route's own endpoint
  with the arguments FastAPI would have given it (path ids, the body as the route's model,
  the caller, the Idempotency-Key, `dry_run=False`). The routes stay the one place their
  logic lives, and the OpenAPI document is FastAPI's.
- The caller is found as FastAPI's dependency finds it (`deps.principal_of`), and a route's
  role requirement (`deps.Requires`) is checked as its dependency would: a missing, unknown
  or revoked key is the same 401, a key of the wrong role the same 403, both raised before
  the body is looked at, as FastAPI's order has it.
- Anything else FastAPI would validate goes to FastAPI: a query string (dry runs), an
  Authorization header that is not one Bearer token, an Idempotency-Key the header's rules
  refuse or given twice, a body the route's model does not take in one step
  (`Model.model_validate_json`, as service/api/bodies.py reads release bodies), a path under
  a root path. FastAPI then answers it — every 4xx word for word its own — with the body
  replayed.
- Exceptions are answered by the app's own exception handlers (refusals, database errors);
  one without a handler propagates, as it would from a route, to the server-error handler.

`tests/service/test_admission_lane.py` sends the same requests to an app with the lane and
one without it and compares the answers; the whole API suite runs through the lane.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api import deps

# The routes the lane serves: the budget admissions a trainer makes in a loop.
LANE_OPERATIONS = ("create_run", "reserve_epoch", "complete_run", "abort_run", "create_release")

_IDEMPOTENCY_KEY = re.compile(deps.IDEMPOTENCY_KEY_PATTERN)
_SHORTEST_KEY, _LONGEST_KEY = deps.IDEMPOTENCY_KEY_LENGTH


class _Pass(Exception):
    """This request is not the lane's common case: FastAPI answers it, with the body the lane
    read (None: not read) given back first."""

    def __init__(self, body: bytes | None = None) -> None:
        super().__init__()
        self.body = body


@dataclass(frozen=True)
class _Route:
    """An endpoint the lane calls, and how to find each of its arguments."""

    route: APIRoute
    endpoint: Callable[..., Awaitable[Response]]
    parameters: tuple[str, ...]
    body: type[BaseModel] | None
    roles: tuple[tuple[str, ...], ...]  # each route dependency's roles (deps.Requires)

    @classmethod
    def of(cls, route: APIRoute) -> _Route:
        """The lane's view of a route; ValueError for one whose arguments it cannot supply."""
        hints = typing.get_type_hints(route.endpoint, include_extras=True)
        known: dict[str, Any] = {
            "request": Request,
            "pipeline": deps.PipelineDep,
            "principal": deps.CurrentKey,
            "idempotency_key": deps.IdempotencyKeyHeader,
            "dry_run": deps.DryRun,
        }
        parameters = tuple(inspect.signature(route.endpoint).parameters)
        body: type[BaseModel] | None = None
        for name in parameters:
            hint = hints.get(name)
            if name in route.param_convertors and hint is str:
                continue
            if name == "body" and isinstance(hint, type) and issubclass(hint, BaseModel):
                body = hint
                continue
            if name not in known or hint != known[name]:
                raise ValueError(f"the admission lane cannot supply {route.name}'s {name!r}")
        roles = []
        for dependency in route.dependencies:
            if not isinstance(dependency.dependency, deps.Requires):
                raise ValueError(f"the admission lane cannot solve {route.name}'s dependencies")
            roles.append(dependency.dependency.roles)
        if not inspect.iscoroutinefunction(route.endpoint) or route.methods != {"POST"}:
            raise ValueError(f"the admission lane serves asynchronous POST routes: {route.name}")
        return cls(route, route.endpoint, parameters, body, tuple(roles))


class AdmissionLane:
    """ASGI middleware serving the common case of the `LANE_OPERATIONS` routes (see module)."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, routes: Iterable[APIRoute]) -> None:
        self.app = app
        self.fastapi = fastapi
        self.routes = [_Route.of(r) for r in routes if r.operation_id in LANE_OPERATIONS]
        missing = set(LANE_OPERATIONS) - {r.route.operation_id for r in self.routes}
        if missing:
            raise ValueError(f"the admission lane has no route for {sorted(missing)}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        for candidate in self.routes:
            match = candidate.route.path_regex.match(path)
            if match is not None:
                break
        else:
            await self.app(scope, receive, send)
            return
        try:
            await self._serve(candidate, match.groupdict(), scope, receive, send)
        except _Pass as passed:
            metrics.LANE.labels("passed").inc()
            await self.app(scope, replaying(passed.body, receive), send)
            return
        metrics.LANE.labels("served").inc()

    async def _serve(
        self,
        target: _Route,
        path_params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Serve the request, or raise _Pass (before answering) when FastAPI must."""
        if scope["query_string"] or scope.get("root_path"):
            raise _Pass
        token, idempotency_key = _headers(scope)
        request = Request(scope, receive)
        scope["route"], scope["endpoint"] = target.route, target.endpoint
        scope["path_params"] = path_params
        try:
            principal = await deps.principal_of(scope, token)
            for roles in target.roles:
                principal.require(*roles)
            arguments: dict[str, Any] = dict(path_params)
            if target.body is not None:
                body = await request.body()
                try:
                    arguments["body"] = target.body.model_validate_json(body)
                except ValidationError:
                    raise _Pass(body) from None
            supplied = {
                "request": request,
                "pipeline": scope["app"].state.pipeline,
                "principal": principal,
                "idempotency_key": idempotency_key,
                "dry_run": False,
            }
            for name in target.parameters:
                if name in supplied:
                    arguments[name] = supplied[name]
            response = await target.endpoint(**arguments)
        except Exception as error:
            handler = self._handler(error)
            if handler is None:
                raise
            response = await handler(request, error)
        await response(scope, receive, send)

    def _handler(self, error: Exception) -> Callable[..., Any] | None:
        """The app's handler for `error` (as starlette's ExceptionMiddleware looks it up),
        leaving unexpected errors to the server-error handler, as a route's would be."""
        handlers = self.fastapi.exception_handlers
        for kind in type(error).__mro__:
            if kind is Exception:
                return None
            if kind in handlers:
                return handlers[kind]
        return None


def _headers(scope: Scope) -> tuple[str | None, str | None]:
    """The bearer token and the Idempotency-Key, or _Pass when FastAPI must read them."""
    authorization: bytes | None = None
    idempotency_key: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is not None:
                raise _Pass
            authorization = value
        elif name == b"idempotency-key":
            if idempotency_key is not None:
                raise _Pass
            idempotency_key = value
    if authorization is None:
        raise _Pass
    scheme, _, credentials = authorization.decode("latin-1").partition(" ")
    token = credentials.strip()
    if scheme.lower() != "bearer" or not token:
        raise _Pass
    if idempotency_key is None:
        return token, None
    key = idempotency_key.decode("latin-1")
    if not _SHORTEST_KEY <= len(key) <= _LONGEST_KEY or not _IDEMPOTENCY_KEY.match(key):
        raise _Pass
    return token, key


def replaying(body: bytes | None, receive: Receive) -> Receive:
    """`receive` with a body already read from it (if one was) given back first: the lane's,
    and the request guard's for a chunked body it measured."""
    if body is None:
        return receive
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
