"""Liveness (no database), readiness (database reachable, migrations at head), metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service import metrics
from service.api.deps import DatabaseDep
from service.api.errors import problem
from service.domain import monitoring

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
def readyz(db: DatabaseDep) -> JSONResponse:
    """The database answers and its schema is at the newest migration."""
    state = monitoring.readiness(db)
    if not state.ready:
        return problem(503, "service_unavailable", "Not ready", state.detail)
    return JSONResponse({"status": "ok", "revision": state.revision})


@router.get("/metrics", operation_id="metrics", response_class=Response)
def prometheus_metrics(db: DatabaseDep) -> Response:
    """Prometheus exposition: requests, latencies, admissions, refusals, replays, lock waits, ε."""
    body = metrics.render(monitoring.dataset_gauges(db))
    return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)
