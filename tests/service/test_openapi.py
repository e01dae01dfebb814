"""What /openapi.json promises a generator, and the HTTP edges it documents.

The document is read as a client generator would: one named problem component, a bearer
scheme, JSON Schema keywords for bounds, formats and enums on what answers carry, a string
CSV, links between operations. The edges: the role comes before the body, every
`validation_error` says where, and `HEAD /livez` answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.storage.models import ENTRY_KINDS
from tests.service.conftest import ADMIN_KEY, Api
from tests.service.test_roles import served_app

PLAN = {"sample_rate": 0.01, "steps_per_epoch": 10, "epochs": 2, "noise_multiplier": 5.0}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with served_app("sqlite", tmp_path_factory.mktemp("openapi")) as served:
        yield served


@pytest.fixture(scope="module")
def spec(client: TestClient) -> dict[str, Any]:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from _walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{where}/{index}")


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            yield method, path, operation


def _number(schema: dict[str, Any]) -> dict[str, Any]:
    """The non-null alternative of an optional field."""
    alternatives: list[dict[str, Any]] = [
        s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"
    ]
    assert len(alternatives) == 1, schema
    return alternatives[0]


def test_bounds_are_json_schema_keywords(spec: dict[str, Any]) -> None:
    """pydantic's own names (ge, le, gt, lt) mean nothing to a client or a fuzzer."""
    leaked = [
        f"{where}/{key}"
        for where, node in _walk(spec)
        for key in ("ge", "le", "gt", "lt")
        if key in node
    ]
    assert leaked == []
    schemas = spec["components"]["schemas"]
    sigma = _number(schemas["RunCreate"]["properties"]["noise_multiplier"])
    assert (sigma["exclusiveMinimum"], sigma["maximum"]) == (0, 1e6)
    delta = _number(schemas["ReleaseCreate"]["properties"]["delta"])
    assert delta["minimum"] == 1e-300 and delta["exclusiveMaximum"] == 1
    cap = _number(schemas["DatasetUpdate"]["properties"]["epsilon_cap"])
    assert (cap["minimum"], cap["maximum"]) == (0, 1e4)
    lease = _number(schemas["RunCreate"]["properties"]["lease_seconds"])
    assert (lease["type"], lease["minimum"], lease["maximum"]) == ("integer", 1, 7 * 24 * 3600)
    values = _number(schemas["ReleaseCreate"]["properties"]["values"])["items"]
    assert (values["minimum"], values["maximum"]) == (-1e300, 1e300)


def test_every_error_answer_references_the_named_problem(spec: dict[str, Any]) -> None:
    found = 0
    for method, path, operation in _operations(spec):
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            found += 1
            content = response["content"]
            assert list(content) == ["application/problem+json"], (method, path, status)
            schema = content["application/problem+json"]["schema"]
            refs = [alt["$ref"] for alt in schema.get("anyOf", [schema])]
            # The plain Problem comes last: it matches every problem, so clients try it last.
            assert refs[-1] == "#/components/schemas/Problem", (method, path, status)
    assert found > 50
    schemas = spec["components"]["schemas"]
    exhausted = schemas["BudgetExhaustedProblem"]
    assert exhausted["properties"]["code"]["const"] == "budget_exhausted"
    assert {"epsilon_cap", "epsilon_after"} <= set(exhausted["required"])
    assert "errors" in schemas["ValidationProblem"]["required"]
    assert "HTTPValidationError" not in schemas


def test_keys_are_a_bearer_security_scheme(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer pl_<key id>_<secret>`.",
    }
    for method, path, operation in _operations(spec):
        parameters = {p["name"].lower() for p in operation.get("parameters", [])}
        assert "authorization" not in parameters, (method, path)
        if path.startswith("/v1/"):
            assert operation["security"] == [{"bearer": []}], (method, path)


def test_answers_carry_formats_and_enums(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    stamps = [
        (name, field, _number(prop))
        for name, schema in schemas.items()
        for field, prop in schema.get("properties", {}).items()
        if field.endswith("_at")
    ]
    assert len(stamps) > 10
    assert [(n, f) for n, f, s in stamps if s.get("format") != "date-time"] == []
    assert schemas["EntryPublic"]["properties"]["kind"]["enum"] == list(ENTRY_KINDS)
    assert schemas["KeyPublic"]["properties"]["role"]["enum"] == ["admin", "trainer", "auditor"]
    assert schemas["ReleasePublic"]["properties"]["mechanism"]["enum"] == [
        "gaussian",
        "laplace",
        "pure_dp",
        "noisy_argmax",
    ]
    assert set(schemas["RunPublic"]["properties"]["status"]["enum"]) == {
        "active",
        "completed",
        "aborted",
        "expired",
    }
    assert schemas["EpochPublic"]["properties"]["sampling"]["enum"] == ["poisson", "shuffle"]


def test_the_csv_export_is_declared_as_a_csv_string(spec: dict[str, Any]) -> None:
    ledger = "/v1/datasets/{dataset_id}/ledger"
    export = spec["paths"][ledger + "/csv"]["get"]["responses"]["200"]["content"]
    assert list(export) == ["text/csv"] and export["text/csv"]["schema"]["type"] == "string"
    listed = spec["paths"][ledger]["get"]["responses"]["200"]["content"]
    assert listed["text/csv"]["schema"]["type"] == "string"


def test_links_lead_from_a_dataset_to_its_runs_and_from_a_run_to_its_epochs(
    spec: dict[str, Any],
) -> None:
    by_id = {op["operationId"]: (path, op) for _, path, op in _operations(spec)}
    created = by_id["create_dataset"][1]["responses"]["201"]["links"]
    assert created["ListRuns"]["operationId"] == "list_runs"
    planned = by_id["create_run"][1]["responses"]["201"]["links"]
    assert planned["ReserveEpoch"] == {
        "operationId": "reserve_epoch",
        "description": "Charge its next epoch.",
        "parameters": {"path.run_id": "$response.body#/id"},
    }
    links = 0
    for _, _, operation in _operations(spec):
        for response in operation["responses"].values():
            for link in response.get("links", {}).values():
                links += 1
                target_path, target = by_id[link["operationId"]]
                names = {f"{p['in']}.{p['name']}" for p in target.get("parameters", [])}
                assert set(link["parameters"]) <= names, link
                assert all(
                    f"{{{n.split('.', 1)[1]}}}" in target_path
                    for n in link["parameters"]
                    if n.startswith("path.")
                )
    assert links > 20


def test_the_role_is_checked_before_the_body(client: TestClient) -> None:
    admin = Api(client, ADMIN_KEY)
    admin.create_dataset("role-first", 5.0)
    trainer = admin.as_key(admin.new_key("trainer", ["role-first"]))
    auditor = admin.as_key(admin.new_key("auditor", ["role-first"]))
    bad_patch = {"epsilon_cap": "lots"}
    assert trainer.patch("/v1/datasets/role-first", bad_patch).status_code == 403
    assert admin.patch("/v1/datasets/role-first", bad_patch).status_code == 422
    assert trainer.post("/v1/keys", {"role": "wizard"}).status_code == 403
    assert trainer.post("/v1/datasets", {"id": ""}).status_code == 403
    assert auditor.post("/v1/datasets/role-first/runs", {"epochs": -1}).status_code == 403
    assert auditor.post("/v1/datasets/role-first/releases", {}).status_code == 403
    refused = trainer.patch("/v1/datasets/role-first", bad_patch)
    assert refused.json()["code"] == "forbidden"
    assert admin.get("/v1/datasets/role-first").json()["epsilon_cap"] == 5.0


def test_every_validation_error_says_where(client: TestClient) -> None:
    admin = Api(client, ADMIN_KEY)
    admin.create_dataset("where", 5.0)
    answers = [
        # refused by the domain, past parsing: the rule concerns the request as a whole
        admin.post("/v1/datasets/where/releases", {"mechanism": "laplace"}),
        # refused by the request guard, before routing
        admin.get("/v1/datasets", params={"after": "a\x00b"}),
        # refused while parsing
        admin.post("/v1/datasets/where/runs", {**PLAN, "epochs": 0}),
    ]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        body = answer.json()
        assert body["code"] == "validation_error"
        assert body["errors"] and all({"loc", "msg", "type"} <= set(e) for e in body["errors"])
        assert body["errors"][0]["msg"]
    assert answers[2].json()["errors"][0]["loc"] == ["body", "epochs"]


def test_head_livez_answers_without_a_body(client: TestClient) -> None:
    answer = client.head("/livez")
    assert answer.status_code == 200
    assert answer.content == b""
    assert client.get("/livez").json() == {"status": "ok"}
