"""Request bodies parsed and validated in one step, for the hot write routes.

FastAPI reads a JSON body with `json.loads` and then validates the Python objects with
pydantic: two passes over every value, in Python objects. For a batch of 100 ten-class vote
histograms that is a thousand counts built, walked and checked twice, on the worker's one GIL
(docs/benchmarks.md, "Inference"). A route made by `parsed_body_route(Model)` hands FastAPI a
request whose `json()` is already `Model.model_validate_json(body)`: pydantic-core parses
and validates in one pass, and FastAPI's own validation of a `Model` instance returns it as it
is. Nothing else changes:

- Anything the one-step parse refuses goes FastAPI's usual way (`json.loads`, then validation
  of the objects), so every 4xx — its type, location and message — is word for word what it
  was; only an admitted body is parsed differently.
- The same schema validates both ways, with the same validators (they receive the same Python
  values), and the OpenAPI document still comes from the route's declared body.
- Floats: pydantic-core's JSON parser (jiter) reads numbers with `lexical-parse-float` in its
  default, exact mode — correctly rounded, as Python's `float()` is — so a value is the same
  double either way, which the noise's sensitivity bound relies on (docs/accounting.md §8).
  tests/service/test_parsed_bodies.py checks that against `json.loads` on hard and random
  decimals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError


class _ParsedJsonRequest(Request):
    """A request whose JSON body is the model itself when the model takes it."""

    model: type[BaseModel]

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = self.model.model_validate_json(body)
            except ValidationError:
                # FastAPI's own path: its JSON errors and its validation errors, unchanged.
                self._json = json.loads(body)
        return self._json


def parsed_body_route(model: type[BaseModel]) -> type[APIRoute]:
    """An APIRoute class whose requests parse their JSON body as `model` in one step."""

    request_class = type(f"Parsed{model.__name__}Request", (_ParsedJsonRequest,), {"model": model})

    class ParsedBodyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def parsed(request: Request) -> Response:
                return await handler(request_class(request.scope, request.receive))

            return parsed

    return ParsedBodyRoute
