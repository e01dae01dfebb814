"""One-step body parsing (`service.api.bodies`): the same model, the same errors, the same
doubles as FastAPI's `json.loads`-then-validate path."""

from __future__ import annotations

import json
import math
import random
import struct
from decimal import Decimal
from typing import Any

import pydantic_core
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from service.api import errors
from service.api.bodies import parsed_body_route
from service.api.schemas import ReleaseCreate


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _decimals() -> list[str]:
    """Hard cases, random decimals of 1–25 digits over the whole exponent range, and numbers
    a hair from the midpoint between two neighbouring doubles (where rounding is decided)."""
    rng = random.Random(20261207)
    out = [
        "2.2250738585072011e-308",
        "2.2250738585072012e-308",
        "4.9406564584124654e-324",
        "2.4703282292062327e-324",
        "2.4703282292062328e-324",
        "1.7976931348623157e308",
        "1.7976931348623158e308",
        "0.1",
        "1e23",
        "9007199254740993.0",
        "1.00000000000000011102230246251565404236316680908203125",
        "1.00000000000000011102230246251565404236316680908203124",
        "1.00000000000000011102230246251565404236316680908203126",
        "123456789012345678901234567890e-30",
        "-0.0",
    ]
    for _ in range(20_000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25)))
        out.append(f"{rng.randint(1, 9)}.{digits}e{rng.randint(-330, 310)}")
    for _ in range(5_000):
        x = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(63)))[0]
        y = math.nextafter(x, math.inf)
        if not (math.isfinite(x) and math.isfinite(y)) or x == 0:
            continue
        middle = (Decimal(x) + Decimal(y)) / 2
        out.append(f"{middle:.40e}")
    return out


def test_floats_parse_to_the_same_double_as_json_loads() -> None:
    """The noise's sensitivity bound needs a correctly rounded parse (½ ulp): pydantic-core
    must give the double Python's json (correctly rounded) gives, bit for bit."""
    differing = [
        s for s in _decimals() if _bits(json.loads(s)) != _bits(pydantic_core.from_json(s))
    ]
    assert differing == []


def _apps() -> tuple[TestClient, TestClient]:
    plain, parsed = APIRouter(), APIRouter(route_class=parsed_body_route(ReleaseCreate))
    seen: dict[str, Any] = {}

    def handler(name: str) -> Any:
        def echo(body: ReleaseCreate) -> dict[str, Any]:
            seen[name] = body
            return body.model_dump(mode="json")

        return echo

    plain.post("/r")(handler("plain"))
    parsed.post("/r")(handler("parsed"))
    apps = []
    for router in (plain, parsed):
        app = FastAPI()
        errors.install(app)  # the service's 422 problems (they carry NaN inputs safely)
        app.include_router(router)
        apps.append(TestClient(app))
    return apps[0], apps[1]


JSON = {"content-type": "application/json"}
VALID = [
    {"mechanism": "laplace", "epsilon": 0.1, "values": [1.0, 2.5e-300, -3.0]},
    {"mechanism": "gaussian", "epsilon": 0.5, "delta": 1e-6, "count": 3.0},
    {"mechanism": "noisy_argmax", "teachers": 9, "votes": [[5, 3, 1], [0, 9, 0]], "noise_scale": 2},
    {"mechanism": "laplace", "epsilon": 1, "name": "caf\u00e9 \u2603", "values": [1e299]},
]
INVALID: list[bytes] = [
    b"",
    b"{",
    b"[1, 2]",
    b'{"mechanism": "laplace", "epsilon": 0.1, "values": [NaN]}',
    b'{"mechanism": "laplace", "epsilon": "0.1"}',
    b'{"mechanism": "laplace", "epsilon": 0.1, "extra": 1}',
    b'{"mechanism": "noisy_argmax", "teachers": 9, "votes": [[5, true]], "noise_scale": 2}',
    b'{"mechanism": "noisy_argmax", "teachers": 9, "votes": [[5, 2.5]], "noise_scale": 2}',
    b'{"mechanism": "noisy_argmax", "teachers": true, "votes": [[5, 1]], "noise_scale": 2}',
    b'{"mechanism": "noisy_argmax", "teachers": 9, "votes": [[5, 1], [1]], "noise_scale": 2}',
    b'{"mechanism": "nope"}',
    b'{"mechanism": "laplace", "epsilon": 1e999}',
    b'{"mechanism": "laplace", "epsilon": 0.1, "count": 99999999999999999999999}',
]


def test_admitted_bodies_give_the_same_model_and_invalid_ones_the_same_errors() -> None:
    plain, parsed = _apps()
    for body in VALID:
        raw = json.dumps(body).encode()
        a, b = (
            c.post("/r", content=raw, headers={"content-type": "application/json"})
            for c in (plain, parsed)
        )
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert a.content == b.content
    for raw in INVALID:
        a, b = (
            c.post("/r", content=raw, headers={"content-type": "application/json"})
            for c in (plain, parsed)
        )
        assert (a.status_code, a.json()) == (b.status_code, b.json()), raw
        assert a.status_code in (400, 422)


def test_an_admitted_body_is_validated_once() -> None:
    """The route's body is the instance the one-step parse made (FastAPI keeps it as it is)."""
    calls = 0
    original = ReleaseCreate.model_validate_json

    def counting(data: Any, **kwargs: Any) -> ReleaseCreate:
        nonlocal calls
        calls += 1
        return original(data, **kwargs)

    _, parsed = _apps()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReleaseCreate, "model_validate_json", counting)
        response = parsed.post("/r", json=VALID[2])
    assert response.status_code == 200 and calls == 1
