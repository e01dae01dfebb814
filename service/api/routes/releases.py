"""Noisy releases: one charge each (for one release, or a batch of K in one entry)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api.bodies import parsed_body_route
from service.api.deps import (
    CurrentKey,
    DryRun,
    IdempotencyKeyHeader,
    PipelineDep,
    idempotency,
    requires,
)
from service.api.responses import dry_run as rehearsal
from service.api.responses import respond
from service.api.schemas import RELEASE_DRY_RUN, ReleaseCreate, ReleasePublic, problems
from service.domain import inference, releases

# One-step parsing of the release body (service/api/bodies.py): the hot path of batched queries.
router = APIRouter(tags=["releases"], route_class=parsed_body_route(ReleaseCreate))
# What a dry run does not have: the release's id and its entry.
_BLANKED = ("id", "ledger_seq")


@router.post(
    "/v1/datasets/{dataset_id}/releases",
    status_code=201,
    response_model=ReleasePublic,
    operation_id="create_release",
    responses={**problems(401, 403, 404, 409, body=True), **RELEASE_DRY_RUN},
    dependencies=[requires("trainer")],
)
async def create_release(
    dataset_id: str,
    body: ReleaseCreate,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
    dry_run: DryRun = False,
) -> Response:
    """Charge a Gaussian, Laplace or pure-DP release (with `values` or `batch` the service adds
    the noise; `count` charges K at once), or K noisy-argmax queries answered by label only."""
    keyed = None if dry_run else idempotency(request, principal, idempotency_key, body)
    if body.mechanism == "noisy_argmax":
        assert body.teachers is not None and body.votes is not None  # the schema checked
        query = inference.ArgmaxSpec(
            teachers=body.teachers,
            votes=body.votes,
            epsilon=body.epsilon,
            delta=body.delta,
            noise_scale=body.noise_scale,
            name=body.name,
        )
        if dry_run:
            return await run_in_threadpool(
                rehearsal,
                lambda: inference.rehearse(pipeline, principal, dataset_id, query),
                _BLANKED,
            )
        # The votes are checked before the lock: in the thread pool (their size is the caller's).
        queries = await run_in_threadpool(inference.queries, principal, dataset_id, query, keyed)
        answered = await pipeline.submit_async(queries)
        return respond(answered)
    spec = releases.ReleaseSpec(
        mechanism=body.mechanism,
        sensitivity=body.sensitivity,
        epsilon=body.epsilon,
        delta=body.delta,
        noise_scale=body.noise_scale,
        values=body.values,
        name=body.name,
        count=body.count,
        batch=body.batch,
    )
    if dry_run:
        return await run_in_threadpool(
            rehearsal, lambda: releases.rehearse(pipeline, principal, dataset_id, spec), _BLANKED
        )
    if spec.values is None and spec.batch is None:
        release = releases.release(principal, dataset_id, spec, keyed)
    else:  # values are noised before the lock: in the thread pool (their size is the caller's)
        release = await run_in_threadpool(releases.release, principal, dataset_id, spec, keyed)
    result = await pipeline.submit_async(release)
    return respond(result)
