"""Results of domain writes → HTTP responses (first answers, replays and dry runs)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse, Response

from service.api import render
from service.api.errors import domain_problem
from service.domain.errors import REFUSALS
from service.domain.pipeline import Replayed


def respond(result: object) -> Response:
    """The response for a write's result, or the replay of the first answer to its key."""
    if isinstance(result, Replayed):
        return Response(
            result.body,
            status_code=result.status,
            media_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )
    first = render.first_answer(result)
    if first is not None:  # the text its Idempotency-Key's record keeps: rendered once
        status, text = first
        return Response(text.encode(), status_code=status, media_type="application/json")
    status, body = render.answer(result)
    return JSONResponse(body, status_code=status)


def dry_run(rehearse: Callable[[], object], id_fields: tuple[str, ...] = ()) -> JSONResponse:
    """What a write would do now: its answer marked admitted (ids it would get blanked), or
    the refusal it would get."""
    try:
        result = rehearse()
    except REFUSALS as refusal:
        return JSONResponse(
            {"dry_run": True, "admitted": False, "refusal": domain_problem(refusal)}
        )
    _, body = render.answer(result)
    blanked = {**body, **{name: None for name in id_fields if name in body}}
    return JSONResponse({**blanked, "dry_run": True, "admitted": True})
