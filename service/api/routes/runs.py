"""DP-SGD runs: plan (hold), epochs (charges), complete/abort (release)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api import render
from service.api.deps import (
    CurrentKey,
    DryRun,
    IdempotencyKeyHeader,
    Limit,
    PipelineDep,
    idempotency,
    requires,
)
from service.api.responses import dry_run as rehearsal
from service.api.responses import respond
from service.api.schemas import (
    EPOCH_DRY_RUN,
    READ_ERRORS,
    RUN_DRY_RUN,
    EpochPublic,
    RunCreate,
    RunPage,
    RunPublic,
    RunWithDataset,
    problems,
)
from service.domain import runs
from service.settings import Settings

router = APIRouter(tags=["runs"])
REFUSALS = problems(401, 403, 404, 409, 422)


@router.post(
    "/v1/datasets/{dataset_id}/runs",
    status_code=201,
    response_model=RunWithDataset,
    operation_id="create_run",
    responses={**problems(401, 403, 404, 409, body=True), **RUN_DRY_RUN},
    dependencies=[requires("trainer")],
)
async def create_run(
    dataset_id: str,
    body: RunCreate,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
    dry_run: DryRun = False,
) -> Response:
    """Plan a run: the ledger calibrates σ (for target_epsilon, or the smallest that fits what
    remains with fit_remaining), or takes it, and holds the whole plan."""
    settings: Settings = request.app.state.settings
    spec = runs.RunSpec(
        sample_rate=body.sample_rate,
        steps_per_epoch=body.steps_per_epoch,
        epochs=body.epochs,
        target_epsilon=body.target_epsilon,
        noise_multiplier=body.noise_multiplier,
        sampling=body.sampling,
        max_grad_norm=body.max_grad_norm,
        name=body.name,
        lease_seconds=body.lease_seconds or settings.default_lease_seconds,
        fit_remaining=bool(body.fit_remaining),
    )
    if dry_run:
        return await run_in_threadpool(
            rehearsal, lambda: runs.rehearse_plan(pipeline, principal, dataset_id, spec), ("id",)
        )
    keyed = idempotency(request, principal, idempotency_key, body)
    # Reads the dataset's terms and calibrates before the lock: in the thread pool.
    plan = await run_in_threadpool(runs.plan, pipeline, principal, dataset_id, spec, keyed)
    result = await pipeline.submit_async(plan)
    return respond(result)


@router.get(
    "/v1/datasets/{dataset_id}/runs",
    response_model=RunPage,
    operation_id="list_runs",
    responses=READ_ERRORS,
)
def list_runs(
    dataset_id: str,
    pipeline: PipelineDep,
    principal: CurrentKey,
    status: Literal["active", "completed", "aborted", "expired"] | None = None,
    limit: Limit = 100,
    after: str | None = None,
) -> RunPage:
    """A dataset's runs in creation order (cursor: `after` = last run id)."""
    rows, more = runs.listing(
        pipeline, principal, dataset_id, status=status, after=after, limit=limit
    )
    return RunPage.model_validate({"data": [render.run(r) for r in rows], "has_more": more})


@router.get(
    "/v1/runs/{run_id}", response_model=RunPublic, operation_id="get_run", responses=READ_ERRORS
)
def get_run(run_id: str, pipeline: PipelineDep, principal: CurrentKey) -> RunPublic:
    """A run."""
    return RunPublic.model_validate(render.run(runs.get(pipeline, principal, run_id)))


@router.post(
    "/v1/runs/{run_id}/epochs",
    status_code=201,
    response_model=EpochPublic,
    operation_id="reserve_epoch",
    responses={**REFUSALS, **EPOCH_DRY_RUN},
)
async def reserve_epoch(
    run_id: str,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
    dry_run: DryRun = False,
) -> Response:
    """Charge the next epoch and get the σ to use; renews the run's lease."""
    if dry_run:
        return await run_in_threadpool(
            rehearsal, lambda: runs.rehearse_epoch(pipeline, principal, run_id), ("ledger_seq",)
        )
    keyed = idempotency(request, principal, idempotency_key, None)
    result = await pipeline.submit_async(runs.epoch(principal, run_id, keyed))
    return respond(result)


async def _finish(
    status: str,
    run_id: str,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    key: str | None,
) -> Response:
    scope = idempotency(request, principal, key, None)
    result = await pipeline.submit_async(runs.finish(principal, run_id, status, scope))
    return respond(result)


@router.post(
    "/v1/runs/{run_id}/complete",
    response_model=RunWithDataset,
    operation_id="complete_run",
    responses=REFUSALS,
)
async def complete_run(
    run_id: str,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Finish a run normally; what is left of its hold is released."""
    return await _finish("completed", run_id, request, pipeline, principal, idempotency_key)


@router.post(
    "/v1/runs/{run_id}/abort",
    response_model=RunWithDataset,
    operation_id="abort_run",
    responses=REFUSALS,
)
async def abort_run(
    run_id: str,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Stop a run early; spent epochs stay spent, the rest of the hold is released."""
    return await _finish("aborted", run_id, request, pipeline, principal, idempotency_key)
