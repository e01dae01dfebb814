"""The published OpenAPI document: FastAPI's, plus what it cannot say from the routes alone.

FastAPI documents the models that routes return; the problem models are only referenced from
`responses` (by name, see `schemas.problems`), so they are published here. The links tell a
client, or a stateful fuzzer, which answer's ids feed which operation.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.api.schemas import PROBLEM_SUBTYPES, Problem, ValidationIssue

_REF_TEMPLATE = "#/components/schemas/{model}"

DATASET_ID = "$response.body#/id"
RUN_ID = "$response.body#/id"


def _link(operation_id: str, description: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation_id, "description": description, "parameters": parameters}


def _dataset_links(dataset_id: str) -> dict[str, Any]:
    """From an answer that names a dataset to what can be done with it."""
    return {
        "GetDataset": _link("get_dataset", "The dataset.", **{"path.dataset_id": dataset_id}),
        "ListRuns": _link("list_runs", "Its runs.", **{"path.dataset_id": dataset_id}),
        "CreateRun": _link("create_run", "Plan a run on it.", **{"path.dataset_id": dataset_id}),
        "CreateRelease": _link(
            "create_release", "Charge a release to it.", **{"path.dataset_id": dataset_id}
        ),
        "ListLedger": _link("list_ledger", "Its ledger.", **{"path.dataset_id": dataset_id}),
        "ExportLedgerCsv": _link(
            "export_ledger_csv", "Its ledger as CSV.", **{"path.dataset_id": dataset_id}
        ),
        "VerifyLedger": _link(
            "verify_ledger", "Verify its ledger.", **{"path.dataset_id": dataset_id}
        ),
    }


def _run_links(run_id: str, dataset_id: str) -> dict[str, Any]:
    """From an answer that names a run to its epochs, its end, its dataset and its entries."""
    run = {"path.run_id": run_id}
    return {
        "GetRun": _link("get_run", "The run.", **run),
        "ReserveEpoch": _link("reserve_epoch", "Charge its next epoch.", **run),
        "CompleteRun": _link("complete_run", "Finish it.", **run),
        "AbortRun": _link("abort_run", "Stop it.", **run),
        "GetDataset": _link("get_dataset", "Its dataset.", **{"path.dataset_id": dataset_id}),
        "ListRunLedger": _link(
            "list_ledger",
            "Its ledger entries.",
            **{"path.dataset_id": dataset_id, "query.run_id": run_id},
        ),
    }


# (operation id, status) → the links of that answer.
LINKS: dict[tuple[str, str], dict[str, Any]] = {
    ("create_dataset", "201"): _dataset_links(DATASET_ID),
    ("get_dataset", "200"): _dataset_links(DATASET_ID),
    ("update_dataset", "200"): _dataset_links(DATASET_ID),
    ("create_run", "201"): _run_links(RUN_ID, "$response.body#/dataset_id"),
    ("get_run", "200"): _run_links(RUN_ID, "$response.body#/dataset_id"),
    ("reserve_epoch", "201"): _run_links("$response.body#/run_id", "$response.body#/dataset/id"),
    ("create_release", "201"): {
        **{
            name: link
            for name, link in _dataset_links("$response.body#/dataset_id").items()
            if name in ("GetDataset", "ListLedger")
        },
        "VoidCharge": _link(
            "void_charge",
            "Void its charge.",
            **{
                "path.dataset_id": "$response.body#/dataset_id",
                "path.seq": "$response.body#/ledger_seq",
            },
        ),
    },
    ("create_key", "201"): {
        "RevokeKey": _link("revoke_key", "Revoke it.", **{"path.key_id": "$response.body#/id"}),
    },
}


def _problem_components() -> dict[str, Any]:
    """The problem models' JSON Schemas, keyed by component name."""
    published: dict[str, Any] = {}
    models: list[type[BaseModel]] = [Problem, ValidationIssue]
    models += [model for subtypes in PROBLEM_SUBTYPES.values() for model in subtypes]
    for model in models:
        schema = model.model_json_schema(ref_template=_REF_TEMPLATE)
        published.update(schema.pop("$defs", {}))
        published[model.__name__] = schema
    return published


def build(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (built once, then cached on the app like FastAPI's own)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_problem_components())
    # Every 422 documents our ValidationProblem; FastAPI's own validation models are unused.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for operations in spec["paths"].values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                links = LINKS.get((operation.get("operationId", ""), status))
                if links:
                    response["links"] = links
    app.openapi_schema = spec
    return spec


def install(app: FastAPI) -> None:
    """Serve `build(app)` at /openapi.json."""

    def openapi() -> dict[str, Any]:
        return build(app)

    app.openapi = openapi  # type: ignore[method-assign]
