"""The admission lane answers exactly as FastAPI does, and serves only what it should.

Two apps on one database, one with the lane and one without, are sent the same script of
requests — admitted, replayed, refused by the domain, refused by validation, unauthenticated,
of the wrong role, dry runs — each on a dataset of its own. Their answers must match: status,
the headers a client reads, and the body once the ids and times that differ by construction are
blanked. The lane's counter says which requests it served and which it passed to FastAPI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service import metrics
from service.api.lane import AdmissionLane
from service.api.routes import releases, runs
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ADMIN_KEY, Api

PLAN = {"sample_rate": 0.01, "steps_per_epoch": 100, "epochs": 3, "noise_multiplier": 1.1}
RELEASE = {"mechanism": "gaussian", "sensitivity": 1.0, "epsilon": 0.1, "delta": 1e-7}
# Differ between two equal histories by construction: generated ids and clock readings.
VARYING = {"id", "run_id", "created_at", "updated_at", "lease_expires_at", "expires_at", "at"}
_ID = re.compile(r"\b(run|rel|key)_?[0-9a-f]{12,}\b")
JSON = {"Content-Type": "application/json"}
CHUNKS = (b'{"mechanism": "laplace", ', b'"sensitivity": 1.0, "epsilon": 0.1}')
READ_HEADERS = ("content-type", "idempotent-replayed", "www-authenticate", "allow")


@pytest.fixture
def apps(migrated_url: str) -> Iterator[dict[str, TestClient]]:
    """The app with the lane and without it, on one database."""
    settings = Settings(database_url=migrated_url, admin_key=ADMIN_KEY)
    with (
        TestClient(create_app(settings), raise_server_exceptions=False) as lane,
        TestClient(create_app(settings, admission_lane=False), raise_server_exceptions=False) as fw,
    ):
        yield {"lane": lane, "framework": fw}


def _blank(value: Any, dataset_id: str) -> Any:
    if isinstance(value, dict):
        return {k: "*" if k in VARYING else _blank(v, dataset_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v, dataset_id) for v in value]
    if isinstance(value, str):
        return _ID.sub("ID", value.replace(dataset_id, "DATASET"))
    return value


def _lane_counts() -> tuple[float, float]:
    def count(outcome: str) -> float:
        return float(metrics.LANE.labels(outcome)._value.get())

    return count("served"), count("passed")


Step = tuple[str, Callable[[Api, str, dict[str, str]], httpx.Response], str]


def _script() -> list[Step]:
    """(name, request, which path the lane should take: served / passed / other)."""

    def plan(body: Any = PLAN, **headers: str) -> Callable[[Api, str, dict[str, str]], Any]:
        return lambda api, d, _: api.post(f"/v1/datasets/{d}/runs", body, headers=headers)

    def on_run(action: str, name: str = "run", **kw: Any) -> Callable[..., Any]:
        return lambda api, _, ids: api.post(f"/v1/runs/{ids[name]}/{action}", **kw)

    def release(body: Any = RELEASE, **kw: Any) -> Callable[..., Any]:
        return lambda api, d, _: api.post(f"/v1/datasets/{d}/releases", body, **kw)

    def as_key(role: str, call: Callable[..., Any]) -> Callable[..., Any]:
        return lambda api, d, ids: call(api.as_key(ids[role]), d, ids)

    return [
        ("plan", as_key("trainer", plan(**{"Idempotency-Key": "k1"})), "served"),
        ("plan replayed", as_key("trainer", plan(**{"Idempotency-Key": "k1"})), "served"),
        (
            "plan, key reused",
            as_key("trainer", plan({**PLAN, "epochs": 4}, **{"Idempotency-Key": "k1"})),
            "served",
        ),
        ("plan, admin", plan(), "served"),
        ("plan, invalid", as_key("trainer", plan({**PLAN, "epochs": -1})), "passed"),
        ("plan, not an object", as_key("trainer", plan([1, 2])), "passed"),
        ("plan, bad key header", as_key("trainer", plan(**{"Idempotency-Key": "a b"})), "passed"),
        ("plan, no key", as_key("none", plan()), "passed"),
        ("plan, bad token", as_key("bogus", plan()), "served"),
        ("plan, auditor", as_key("auditor", plan()), "served"),
        ("plan, auditor, invalid", as_key("auditor", plan({"epochs": 0})), "served"),
        (
            "plan, too much",
            as_key("trainer", plan({**PLAN, "target_epsilon": 500.0, "noise_multiplier": None})),
            "served",
        ),
        ("epoch", as_key("trainer", on_run("epochs")), "served"),
        (
            "epoch, keyed",
            as_key("trainer", on_run("epochs", headers={"Idempotency-Key": "e1"})),
            "served",
        ),
        (
            "epoch, replayed",
            as_key("trainer", on_run("epochs", headers={"Idempotency-Key": "e1"})),
            "served",
        ),
        (
            "epoch, dry run",
            as_key("trainer", on_run("epochs", params={"dry_run": "true"})),
            "passed",
        ),
        ("epoch, auditor", as_key("auditor", on_run("epochs")), "served"),
        ("epoch, no such run", as_key("trainer", on_run("epochs", name="absent")), "served"),
        ("release", as_key("trainer", release()), "served"),
        ("release, invalid", as_key("trainer", release({**RELEASE, "epsilon": 0})), "passed"),
        (
            "release, not json",
            as_key("trainer", release(None, content=b"{", headers=JSON)),
            "passed",
        ),
        (  # no Content-Length: the request guard reads the body and replays it to the lane
            "release, chunked",
            as_key("trainer", release(None, content=iter(CHUNKS), headers=JSON)),
            "served",
        ),
        ("complete", as_key("trainer", on_run("complete")), "served"),
        ("complete again", as_key("trainer", on_run("complete")), "served"),
        ("epoch, completed run", as_key("trainer", on_run("epochs")), "served"),
        ("abort, completed run", as_key("trainer", on_run("abort")), "served"),
        ("abort", as_key("trainer", on_run("abort", name="second")), "served"),
        ("dataset (not a lane route)", lambda api, d, _: api.get(f"/v1/datasets/{d}"), "other"),
    ]


def _play(client: TestClient, dataset_id: str) -> list[tuple[str, int, dict[str, str], Any, str]]:
    admin = Api(client, ADMIN_KEY)
    admin.create_dataset(dataset_id, 5.0)
    ids = {
        "trainer": admin.new_key("trainer"),
        "auditor": admin.new_key("auditor"),
        "none": "",
        "bogus": "pl_key0000000000000000_nothing",
        "absent": "run_00000000000000000000dead",
    }
    ids["second"] = admin.post(f"/v1/datasets/{dataset_id}/runs", PLAN).json()["id"]
    answers = []
    for name, call, _ in _script():
        served, passed = _lane_counts()
        response = call(admin, dataset_id, ids)
        if name == "plan":
            ids["run"] = response.json()["id"]
        served_now, passed_now = _lane_counts()
        took = "served" if served_now > served else "passed" if passed_now > passed else "other"
        headers = {h: response.headers[h] for h in READ_HEADERS if h in response.headers}
        try:
            body = _blank(response.json(), dataset_id)
        except ValueError:
            body = response.text
        answers.append((name, response.status_code, headers, body, took))
    return answers


def test_the_lane_answers_as_the_framework_does(apps: dict[str, TestClient]) -> None:
    with_lane = _play(apps["lane"], "lane-data")
    without = _play(apps["framework"], "framework-data")
    assert [a[4] for a in without] == ["other"] * len(without)  # nothing took the lane
    assert [a[4] for a in with_lane] == [step[2] for step in _script()]
    for mine, theirs in zip(with_lane, without, strict=True):
        assert mine[:4] == theirs[:4], mine[0]
    statuses = {a[0]: a[1] for a in with_lane}
    # The script reaches what it means to: admitted, replayed, refused at each layer.
    assert statuses["plan"] == statuses["epoch"] == statuses["release"] == 201
    assert statuses["release, chunked"] == 201
    assert statuses["plan, key reused"] == statuses["plan, invalid"] == 422
    assert statuses["plan, not an object"] == statuses["release, invalid"] == 422
    assert statuses["release, not json"] == 400
    assert statuses["plan, no key"] == statuses["plan, bad token"] == 401
    assert statuses["plan, auditor"] == statuses["plan, auditor, invalid"] == 403
    assert statuses["plan, too much"] == statuses["complete again"] == 409
    assert statuses["epoch, no such run"] == 404
    assert statuses["epoch, dry run"] == statuses["complete"] == statuses["abort"] == 200
    assert dict((a[0], a[2]) for a in with_lane)["epoch, replayed"]["idempotent-replayed"]


def test_the_access_log_and_metrics_name_the_route(apps: dict[str, TestClient]) -> None:
    """A request the lane serves is counted under its route's template, as FastAPI's are."""
    api = Api(apps["lane"], ADMIN_KEY)
    api.create_dataset("lane-metrics", 5.0)
    run_id = api.post("/v1/datasets/lane-metrics/runs", PLAN).json()["id"]
    before = metrics.REQUESTS.labels("POST", "/v1/runs/{run_id}/epochs", "201")._value.get()
    assert api.post(f"/v1/runs/{run_id}/epochs").status_code == 201
    after = metrics.REQUESTS.labels("POST", "/v1/runs/{run_id}/epochs", "201")._value.get()
    assert after == before + 1


def test_the_lane_refuses_routes_it_cannot_serve(tmp_path: Path) -> None:
    """It is built only for the asynchronous POST routes whose arguments it can supply."""
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/x.db"), admission_lane=False)
    routes = [r for r in (*runs.router.routes, *releases.router.routes) if isinstance(r, APIRoute)]
    AdmissionLane(app, app, routes)  # builds
    with pytest.raises(ValueError, match="no route for"):
        AdmissionLane(app, app, [r for r in routes if r.operation_id != "reserve_epoch"])

    async def paged(run_id: str, limit: int = 10) -> Response:
        return Response()

    unsupplied = APIRoute("/v1/x/{run_id}", paged, methods=["POST"], operation_id="abort_run")
    with pytest.raises(ValueError, match="cannot supply paged's 'limit'"):
        AdmissionLane(app, app, [*routes, unsupplied])
