"""Datasets: create, list, read, change caps/freeze/description (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api import render
from service.api.deps import (
    CurrentKey,
    IdempotencyKeyHeader,
    Limit,
    PipelineDep,
    idempotency,
    requires,
)
from service.api.responses import respond
from service.api.schemas import (
    READ_ERRORS,
    DatasetCreate,
    DatasetPage,
    DatasetPublic,
    DatasetUpdate,
    DpSgdShares,
    ExplicitShares,
    problems,
)
from service.domain import datasets

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    operation_id="create_dataset",
    responses=problems(401, 403, 404, 409, body=True),
    dependencies=[requires("admin")],
)
def create_dataset(
    body: DatasetCreate,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create a dataset with a cap (ε, δ) and its filter's shares of δ. δ is fixed from then
    on; the shares too, or, with first_admission (the default), from its first admission."""
    shares = body.shares
    if shares is None:
        choice = datasets.SharesChoice()
    elif isinstance(shares, DpSgdShares):
        choice = datasets.SharesChoice("dp_sgd", shares.sample_rate, shares.steps)
    elif isinstance(shares, ExplicitShares):
        choice = datasets.SharesChoice(
            "explicit", orders=tuple(shares.orders), weights=tuple(shares.weights)
        )
    else:
        choice = datasets.SharesChoice(shares.profile)
    spec = datasets.DatasetSpec(body.id, body.epsilon_cap, body.delta, body.description, choice)
    scope = idempotency(request, principal, idempotency_key, body)
    return respond(datasets.create(pipeline, principal, spec, scope))


@router.get("", response_model=DatasetPage, operation_id="list_datasets", responses=READ_ERRORS)
def list_datasets(
    pipeline: PipelineDep, principal: CurrentKey, limit: Limit = 100, after: str | None = None
) -> DatasetPage:
    """Datasets this key may see, in id order (cursor: `after` = last id)."""
    views, more = datasets.listing(pipeline, principal, after=after, limit=limit)
    return DatasetPage.model_validate(
        {"data": [render.dataset(v) for v in views], "has_more": more}
    )


@router.get(
    "/{dataset_id}", response_model=DatasetPublic, operation_id="get_dataset", responses=READ_ERRORS
)
def get_dataset(dataset_id: str, pipeline: PipelineDep, principal: CurrentKey) -> DatasetPublic:
    """A dataset's cap and composed ε (spent, reserved, remaining)."""
    return DatasetPublic.model_validate(
        render.dataset(datasets.get(pipeline, principal, dataset_id))
    )


@router.patch(
    "/{dataset_id}",
    response_model=DatasetPublic,
    operation_id="update_dataset",
    responses=problems(401, 403, 404, 409, body=True),
    dependencies=[requires("admin")],
)
def update_dataset(
    dataset_id: str,
    body: DatasetUpdate,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Raise/lower the cap, freeze/unfreeze, or change the description; each is a ledger entry.

    A cap lowered below what is already posted and held is refused (409 `cap_below_reserved`).
    """
    patch = datasets.DatasetPatch(body.epsilon_cap, body.frozen, body.description, body.reason)
    scope = idempotency(request, principal, idempotency_key, body)
    return respond(datasets.update(pipeline, principal, dataset_id, patch, scope))
