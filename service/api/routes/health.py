"""Liveness (no database), readiness (database reachable, migrations at head), metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service import metrics
from service.api.errors import problem
from service.storage import migrate
from service.storage.database import Database

router = APIRouter(tags=["health"])


@router.get("/livez", operation_id="livez")
def livez() -> dict[str, str]:
    """The process is up (touches nothing else)."""
    return {"status": "ok"}


@router.head("/livez", operation_id="livez_head", response_class=Response)
def livez_head() -> Response:
    """The process is up: `/livez` for probes that send HEAD (200, no body)."""
    return Response(status_code=200)


@router.get("/readyz", operation_id="readyz")
def readyz(request: Request) -> JSONResponse:
    """The database answers and its schema is at the newest migration."""
    db: Database = request.app.state.db
    try:
        with db.read() as session:
            session.execute(text("SELECT 1"))
        current = migrate.current_revision(db.read_engine)
    except SQLAlchemyError:
        return problem(503, "service_unavailable", "Not ready", "the database is unreachable")
    head = migrate.head_revision()
    if current != head:
        detail = f"database schema at {current}, expected {head}: run `privacy-ledger db upgrade`"
        return problem(503, "service_unavailable", "Not ready", detail)
    return JSONResponse({"status": "ok", "revision": current})


@router.get("/metrics", operation_id="metrics", response_class=Response)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition: requests, latencies, admissions, refusals, replays, lock waits, ε."""
    db: Database = request.app.state.db
    return Response(metrics.render(db), media_type=metrics.CONTENT_TYPE_LATEST)
