"""The ledger: paged JSON, streamed CSV/JSON export, verification, voids (admin)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

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
    MAX_SEQ,
    READ_ERRORS,
    EntryPage,
    EntryPublic,
    VerifyPublic,
    VoidCreate,
    problems,
)
from service.domain import datasets
from service.domain.ledger import ENTRY_KINDS, LedgerEntry

router = APIRouter(prefix="/v1/datasets/{dataset_id}/ledger", tags=["ledger"])
Kind = Literal[ENTRY_KINDS]  # type: ignore[valid-type]

CSV_COLUMNS = (
    "seq",
    "created_at",
    "kind",
    "actor",
    "actor_name",
    "actor_role",
    "run_id",
    "release_id",
    "voids_seq",
    "mechanism",
    "epsilon",
    "pure",
    "epsilon_spent_before",
    "epsilon_spent_after",
    "epsilon_reserved_before",
    "epsilon_reserved_after",
    "details",
    "idempotency_key",
    "prev_hash",
    "hash",
)


def _csv(entries: Iterator[LedgerEntry]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for count, row in enumerate(entries, start=1):
        body = render.entry(row)
        writer.writerow(
            json.dumps(body[c], sort_keys=True) if isinstance(body[c], dict) else body[c]
            for c in CSV_COLUMNS
        )
        if count % 500 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _json(entries: Iterator[LedgerEntry]) -> Iterator[str]:
    yield '{"data":['
    for count, row in enumerate(entries):
        yield ("," if count else "") + json.dumps(render.entry(row), separators=(",", ":"))
    yield '],"has_more":false}'


CSV_CONTENT = {
    "text/csv": {"schema": {"type": "string", "description": "RFC 4180 CSV, a header row."}}
}


@router.get(
    "",
    response_model=EntryPage,
    operation_id="list_ledger",
    responses={**READ_ERRORS, 200: {"content": CSV_CONTENT}},
)
def list_ledger(
    dataset_id: str,
    pipeline: PipelineDep,
    principal: CurrentKey,
    limit: Limit = 100,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    kind: Kind | None = None,
    run_id: str | None = None,
    format: Literal["json", "csv", "export"] | None = None,
    accept: Annotated[str | None, Header()] = None,
) -> EntryPage | StreamingResponse:
    """A page of entries in seq order (cursor: `after` = last seq).

    `format=csv` (or `Accept: text/csv`) streams every matching entry as CSV (a generated
    client reads that from `export_ledger_csv`, whose only answer is CSV);
    `format=export` streams every matching entry as one JSON document.
    """
    wants_csv = format == "csv" or (format is None and accept is not None and "text/csv" in accept)
    if wants_csv:
        return _csv_export(pipeline, principal, dataset_id, kind, run_id)
    if format == "export":
        entries = datasets.entries_export(pipeline, principal, dataset_id, kind=kind, run_id=run_id)
        headers = {"Content-Disposition": f'attachment; filename="{dataset_id}-ledger.json"'}
        return StreamingResponse(_json(entries), media_type="application/json", headers=headers)
    rows, more = datasets.entries_page(
        pipeline, principal, dataset_id, after=after, limit=limit, kind=kind, run_id=run_id
    )
    return EntryPage.model_validate({"data": [render.entry(r) for r in rows], "has_more": more})


def _csv_export(
    pipeline: PipelineDep,
    principal: CurrentKey,
    dataset_id: str,
    kind: str | None,
    run_id: str | None,
) -> StreamingResponse:
    entries = datasets.entries_export(pipeline, principal, dataset_id, kind=kind, run_id=run_id)
    headers = {"Content-Disposition": f'attachment; filename="{dataset_id}-ledger.csv"'}
    return StreamingResponse(_csv(entries), media_type="text/csv", headers=headers)


@router.get(
    "/csv",
    response_class=StreamingResponse,
    operation_id="export_ledger_csv",
    responses={
        **READ_ERRORS,
        200: {"description": "Every matching entry.", "content": CSV_CONTENT},
    },
)
def export_ledger_csv(
    dataset_id: str,
    pipeline: PipelineDep,
    principal: CurrentKey,
    kind: Kind | None = None,
    run_id: str | None = None,
) -> StreamingResponse:
    """Every matching entry as CSV, in seq order (the same as `format=csv` on the ledger)."""
    return _csv_export(pipeline, principal, dataset_id, kind, run_id)


@router.get(
    "/verify", response_model=VerifyPublic, operation_id="verify_ledger", responses=READ_ERRORS
)
def verify_ledger(dataset_id: str, pipeline: PipelineDep, principal: CurrentKey) -> VerifyPublic:
    """Recompute the hash chain, replay the curves against the dataset's cached state, and check
    its cached active-run count and lease bound against its runs."""
    result = datasets.verify(pipeline, principal, dataset_id)
    return VerifyPublic.model_validate(result, from_attributes=True)


@router.post(
    "/{seq}/void",
    status_code=201,
    response_model=EntryPublic,
    operation_id="void_charge",
    responses=problems(401, 403, 404, 409, body=True),
    dependencies=[requires("admin")],
)
def void_charge(
    dataset_id: str,
    seq: Annotated[int, Path(ge=1, le=MAX_SEQ)],
    body: VoidCreate,
    request: Request,
    pipeline: PipelineDep,
    principal: CurrentKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Void a charge (admin): a `void` entry with a reason; nothing is edited.

    The charge's cost is kept unless `refund` is true; a refund subtracts it and puts the
    dataset outside the filter's guarantee from then on (`outside_guarantee`).
    """
    scope = idempotency(request, principal, idempotency_key, body)
    return respond(
        datasets.void(pipeline, principal, dataset_id, seq, body.reason, scope, refund=body.refund)
    )
