"""Crafted bad requests: each gets its 4xx problem+json with a stable code; the ledger is untouched.

Every case checks the answer (status, `application/problem+json`, `code`, `type`, and for schema
errors where the problem is) and then that nothing moved: the dataset the requests aim at has the
same `ledger_seq`, `epsilon_spent`, `epsilon_reserved` (the whole dataset document, in fact; its
`ledger_seq` also moves with any charge, hold or release of the shared run), the dataset the cases
try to create is still absent, no key appeared, and the ledger still verifies.

The app is built once per backend (module scope); the idempotency tests at the end charge their
own datasets.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.service.conftest import ADMIN_KEY, Api
from tests.service.test_roles import served_app

DATASET = "bad-input"
PLAN = {"sample_rate": 0.01, "steps_per_epoch": 10, "epochs": 2, "noise_multiplier": 5.0}
RELEASE = {"mechanism": "laplace", "sensitivity": 1.0, "epsilon": 0.1}
NEW_DATASET = {"id": "never-created", "epsilon_cap": 1.0, "delta": 1e-5}
EPSILON = {"sample_rate": 0.01, "noise_multiplier": 1.0, "steps": 100, "delta": 1e-5}
SIGMA = {"sample_rate": 0.01, "steps": 100, "target_epsilon": 2.0, "delta": 1e-5}
MAX_BODY = 8 * 1024 * 1024  # Settings.max_body_bytes' default, which the fixture keeps

DATASETS = "/v1/datasets"
ONE = "/v1/datasets/{dataset}"
RUNS = "/v1/datasets/{dataset}/runs"
RELEASES = "/v1/datasets/{dataset}/releases"
LEDGER = "/v1/datasets/{dataset}/ledger"
VOID = "/v1/datasets/{dataset}/ledger/{seq}/void"
EPOCHS = "/v1/runs/{run}/epochs"
KEYS = "/v1/keys"
PLAN_EPSILON = "/v1/accountant/epsilon"
PLAN_SIGMA = "/v1/accountant/noise-multiplier"


@dataclass
class World:
    """One backend's app: a dataset with an active run and a voidable charge, and a trainer."""

    admin: Api
    trainer: Api
    run_id: str
    charge_seq: int

    def state(self, keys: bool = False) -> tuple[Any, ...]:
        """What a refused request must leave as it was: the dataset document (its `ledger_seq`
        moves with every charge, hold, release and change, of the shared run's too), that the
        dataset the cases try to create is still absent, and with `keys` the list of keys."""
        dataset = self.admin.get(f"/v1/datasets/{DATASET}")
        assert dataset.status_code == 200, dataset.text
        created = self.admin.get(f"/v1/datasets/{NEW_DATASET['id']}").status_code
        listed = self.admin.get("/v1/keys", params={"limit": 1000}).json() if keys else None
        return dataset.json(), created, listed

    def assert_ledger_verifies(self, dataset_id: str = DATASET) -> None:
        verified = self.admin.get(f"/v1/datasets/{dataset_id}/ledger/verify")
        assert verified.status_code == 200, verified.text
        assert verified.json()["ok"] is True, verified.json()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One app per backend for the whole module."""
    with served_app(request.param, tmp_path_factory.mktemp("bad-input")) as client:
        admin = Api(client, ADMIN_KEY)
        trainer = admin.as_key(admin.new_key("trainer"))
        admin.create_dataset(DATASET, 10.0)
        run = trainer.post(f"/v1/datasets/{DATASET}/runs", PLAN)
        assert run.status_code == 201, run.text
        charge = trainer.post(f"/v1/datasets/{DATASET}/releases", RELEASE)
        assert charge.status_code == 201, charge.text
        yield World(admin, trainer, run.json()["id"], charge.json()["ledger_seq"])


_NO_BODY = object()


@dataclass(frozen=True)
class Case:
    """One bad request and the problem it must get."""

    method: str
    path: str
    status: int
    code: str
    body: Any = _NO_BODY  # sent as JSON
    content: bytes | None = None  # sent as is (NaN literals, broken JSON, other media types)
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    caller: str = "admin"
    loc: tuple[str | int, ...] | None = None  # where a schema error must point
    allow: frozenset[str] = frozenset()  # a 405's Allow header

    def send(self, world: World) -> httpx.Response:
        api = world.trainer if self.caller == "trainer" else world.admin
        path = self.path.format(dataset=DATASET, run=world.run_id, seq=world.charge_seq)
        headers = dict(self.headers)
        kwargs: dict[str, Any] = {"params": list(self.params)}
        if self.content is not None:
            kwargs["content"] = self.content
            if self.content_type is not None:
                headers["content-type"] = self.content_type
        elif self.body is not _NO_BODY:
            kwargs["json"] = self.body
        return api.client.request(self.method, path, headers=api.headers(headers), **kwargs)


Where = str | tuple[str | int, ...] | None
_FIELD = "the one member changed"  # sentinel: point at the member the case changes


def case(name: str, method: str, path: str, status: int, code: str, **fields: Any) -> Any:
    """One table row: a Case with its test id."""
    return pytest.param(Case(method, path, status, code, **fields), id=name)


def refused(
    name: str, method: str, path: str, body: Any, where: Where = None, **fields: Any
) -> Any:
    """422 validation_error. `where`: the body member (or whole loc) a schema error points at;
    None when the domain refuses (calibration, mechanism rules), which has no `errors`."""
    loc = ("body", where) if isinstance(where, str) else where
    return case(name, method, path, 422, "validation_error", body=body, loc=loc, **fields)


def _changed(base: dict[str, Any], where: Where, changes: dict[str, Any]) -> tuple[Any, Where]:
    if where == _FIELD:
        (where,) = changes
    return {**base, **changes}, where


def new_dataset(case_id: str, where: Where = _FIELD, /, **changes: Any) -> Any:
    body, where = _changed(NEW_DATASET, where, changes)
    return refused(case_id, "POST", DATASETS, body, where)


def cap_change(case_id: str, where: Where = _FIELD, /, **changes: Any) -> Any:
    body, where = _changed({}, where, changes)
    return refused(case_id, "PATCH", ONE, body, where)


def plan(case_id: str, where: Where = _FIELD, /, **changes: Any) -> Any:
    body, where = _changed(PLAN, where, changes)
    return refused(case_id, "POST", RUNS, body, where, caller=T)


def release(case_id: str, where: Where = _FIELD, /, *, base: Any = RELEASE, **changes: Any) -> Any:
    body, where = _changed(base, where, changes)
    return refused(case_id, "POST", RELEASES, body, where, caller=T)


def calculator(case_id: str, where: Where = _FIELD, /, **changes: Any) -> Any:
    body, where = _changed(EPSILON, where, changes)
    return refused(case_id, "POST", PLAN_EPSILON, body, where)


def key(case_id: str, where: Where = _FIELD, /, **changes: Any) -> Any:
    body, where = _changed({"role": "trainer"}, where, changes)
    return refused(case_id, "POST", KEYS, body, where)


def raw(name: str, method: str, path: str, base: dict[str, Any], member: str, value: str) -> Any:
    """`base` with `member` set to a raw JSON literal (NaN, Infinity) that json.dumps won't write;
    Python's json, and so the request parser, reads them, so the schema must refuse them."""
    content = json.dumps({**base, member: "@@"}).replace('"@@"', value).encode()
    caller = T if path in (RUNS, RELEASES) else "admin"
    where = ("body", member, 1) if member == "values" else ("body", member)
    return case(
        name, method, path, 422, "validation_error", content=content, loc=where, caller=caller
    )


def query(name: str, path: str, parameter: str, value: str) -> Any:
    params = ((parameter, value),)
    return refused(name, "GET", path, _NO_BODY, ("query", parameter), params=params)


def idempotency_key(name: str, method: str, path: str, body: Any, value: str) -> Any:
    headers = (("Idempotency-Key", value),)
    caller = "admin" if path == DATASETS else T
    where = ("header", "Idempotency-Key")
    return refused(name, method, path, body, where, headers=headers, caller=caller)


def not_found(
    name: str, method: str, path: str, body: Any = _NO_BODY, caller: str = "admin"
) -> Any:
    return case(name, method, path, 404, "not_found", body=body, caller=caller)


def not_json(
    name: str, path: str, content: bytes, media_type: str | None, caller: str = "admin"
) -> Any:
    fields = {"content": content, "content_type": media_type, "caller": caller}
    return case(name, "POST", path, 415, "unsupported_media_type", **fields)


def malformed(name: str, path: str, content: bytes, caller: str = "admin") -> Any:
    return case(name, "POST", path, 400, "malformed_request", content=content, caller=caller)


def wrong_method(name: str, method: str, path: str, *allowed: str) -> Any:
    body = {} if method in ("POST", "PUT", "PATCH") else _NO_BODY
    fields = {"body": body, "allow": frozenset(allowed)}
    return case(name, method, path, 405, "method_not_allowed", **fields)


def quoted(dataset_id: str) -> str:
    return "/v1/datasets/" + quote(dataset_id, safe="")


SQL = "'; DROP TABLE datasets; --"
T = "trainer"
ONE_MANY_STEPS = {"steps_per_epoch": 100_000, "epochs": 100_000}
IMPOSSIBLE = {"sample_rate": 1.0, "steps_per_epoch": 1000, "epochs": 1000, "target_epsilon": 1e-9}
NO_SIGMA = {k: v for k, v in PLAN.items() if k != "noise_multiplier"}
LAPLACE_OVERFLOW = {"mechanism": "laplace", "sensitivity": 1e12, "noise_scale": 1e-300}
DRY = (("dry_run", "true"),)
MAYBE = (("dry_run", "maybe"),)
VOID_AT = "/v1/datasets/{dataset}/ledger/%s/void"
DELTA_FREE = {"mechanism": "gaussian", "epsilon": 1.0}
HUGE_BODY = b'{"id": "' + b"a" * (10 * 1024 * 1024) + b'"}'
NESTED_OBJECTS = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
FORM = b"sample_rate=0.01&steps_per_epoch=10&epochs=2&noise_multiplier=5"
FORM_TYPE = "application/x-www-form-urlencoded"
IMPOSSIBLE_TARGET = {"sample_rate": 1.0, "steps": 10**6, "target_epsilon": 1e-9, "delta": 1e-5}
TINY_RATE = {"sample_rate": 5e-324, "steps": 1, "target_epsilon": 5e-324, "delta": 1 - 2**-53}

CASES = [
    # --- NaN and infinities.
    raw("dataset_cap_nan", "POST", DATASETS, NEW_DATASET, "epsilon_cap", "NaN"),
    raw("dataset_cap_infinity", "POST", DATASETS, NEW_DATASET, "epsilon_cap", "Infinity"),
    raw("dataset_delta_minus_infinity", "POST", DATASETS, NEW_DATASET, "delta", "-Infinity"),
    raw("dataset_cap_overflowing_literal", "POST", DATASETS, NEW_DATASET, "epsilon_cap", "1e999"),
    raw("cap_change_nan", "PATCH", ONE, {}, "epsilon_cap", "NaN"),
    raw("plan_sample_rate_nan", "POST", RUNS, PLAN, "sample_rate", "NaN"),
    raw("plan_sigma_infinity", "POST", RUNS, PLAN, "noise_multiplier", "Infinity"),
    raw("release_epsilon_nan", "POST", RELEASES, RELEASE, "epsilon", "NaN"),
    raw("release_values_nan", "POST", RELEASES, RELEASE, "values", "[1.0, NaN, 3.0]"),
    raw("release_values_infinity", "POST", RELEASES, RELEASE, "values", "[0, -Infinity]"),
    raw("calc_sigma_nan", "POST", PLAN_EPSILON, EPSILON, "noise_multiplier", "NaN"),
    raw("calc_target_infinity", "POST", PLAN_SIGMA, SIGMA, "target_epsilon", "Infinity"),
    # --- Dataset caps, δ and text.
    new_dataset("cap_negative", epsilon_cap=-1),
    new_dataset("cap_huge", epsilon_cap=1e300),
    new_dataset("cap_above_max", epsilon_cap=10000.5),
    new_dataset("cap_string", epsilon_cap="8"),
    new_dataset("cap_boolean", epsilon_cap=True),
    new_dataset("delta_zero", delta=0),
    new_dataset("delta_one", delta=1),
    new_dataset("delta_negative", delta=-1e-5),
    new_dataset("delta_null", delta=None),
    new_dataset("delta_subnormal", delta=5e-324),  # δ/|orders| underflowed to 0: was a 500
    new_dataset("unknown_field", owner="me"),
    new_dataset("description_too_long", description="x" * 2001),
    new_dataset("description_with_nul", description="a\x00b"),
    raw("description_lone_surrogate", "POST", DATASETS, NEW_DATASET, "description", '"\\ud800"'),
    # --- Dataset ids: refused on creation, simply not found on reading.
    new_dataset("id_sql", id=SQL),
    new_dataset("id_unicode", id="ü"),
    new_dataset("id_65_chars", id="a" * 65),
    new_dataset("id_path_traversal", id="../x"),
    new_dataset("id_empty", id=""),
    new_dataset("id_leading_dash", id="-x"),
    new_dataset("id_trailing_newline", id="abc\n"),
    new_dataset("id_with_space", id="a b"),
    new_dataset("id_number", id=7),
    not_found("read_sql_id", "GET", quoted(SQL)),
    not_found("read_unicode_id", "GET", quoted("ü")),
    not_found("read_65_char_id", "GET", quoted("a" * 65)),
    not_found("read_traversal_id", "GET", quoted("../x")),
    not_found("read_nul_id", "GET", quoted("a\x00b")),
    not_found("ledger_of_sql_id", "GET", quoted(SQL) + "/ledger"),
    not_found("runs_of_unicode_id", "GET", quoted("ü") + "/runs"),
    # --- Unknown datasets, runs, entries and keys (with otherwise valid requests).
    not_found("unknown_dataset", "GET", "/v1/datasets/nope"),
    not_found("unknown_dataset_change", "PATCH", "/v1/datasets/nope", {"description": "x"}),
    not_found("unknown_dataset_plan", "POST", "/v1/datasets/nope/runs", PLAN, T),
    not_found("unknown_dataset_release", "POST", "/v1/datasets/nope/releases", RELEASE, T),
    not_found("unknown_dataset_verify", "GET", "/v1/datasets/nope/ledger/verify"),
    not_found("unknown_dataset_void", "POST", "/v1/datasets/nope/ledger/1/void", {"reason": "x"}),
    not_found("unknown_run", "GET", "/v1/runs/run_0000000000000000deadbeef"),
    not_found("unknown_run_sql", "GET", "/v1/runs/" + quote(SQL, safe="")),
    not_found("unknown_run_epoch", "POST", "/v1/runs/run_nope/epochs", caller=T),
    not_found("unknown_run_complete", "POST", "/v1/runs/run_nope/complete", caller=T),
    not_found("unknown_run_abort", "POST", "/v1/runs/run_nope/abort", caller=T),
    not_found("unknown_entry_void", "POST", VOID_AT % 9999, {"reason": "x"}),
    not_found("unknown_key_revoke", "DELETE", "/v1/keys/keynope"),
    # --- DP-SGD plans.
    plan("sample_rate_zero", sample_rate=0),
    plan("sample_rate_above_one", sample_rate=1.5),
    plan("sample_rate_negative", sample_rate=-1),
    plan("sample_rate_boolean", sample_rate=True),
    plan("sample_rate_string", sample_rate="0.01"),
    plan("sample_rate_subnormal", sample_rate=5e-324),
    plan("steps_zero", steps_per_epoch=0),
    plan("steps_negative", steps_per_epoch=-1),
    plan("steps_1e12", steps_per_epoch=1e12),
    plan("steps_fraction", steps_per_epoch=10.5),
    plan("steps_word", steps_per_epoch="ten"),
    plan("steps_boolean", steps_per_epoch=True),
    plan("epochs_zero", epochs=0),
    plan("epochs_huge", epochs=10**30),
    plan("plan_too_many_steps", ("body",), **ONE_MANY_STEPS),
    plan("sigma_zero", noise_multiplier=0),
    plan("sigma_negative", noise_multiplier=-1.0),
    # (q = 1: with subsampling the accountant spends seconds on this σ before refusing it.)
    plan("sigma_unbounded_epsilon", None, sample_rate=1.0, noise_multiplier=1e-200),
    plan("sigma_and_target", ("body",), target_epsilon=1.0),
    refused("neither_sigma_nor_target", "POST", RUNS, NO_SIGMA, ("body",), caller=T),
    refused("target_impossible", "POST", RUNS, IMPOSSIBLE, None, caller=T),
    plan("target_zero", "target_epsilon", noise_multiplier=None, target_epsilon=0),
    plan("sampling_unknown", sampling="uniform"),
    plan("lease_zero", lease_seconds=0),
    plan("lease_a_year", lease_seconds=365 * 86400),
    plan("max_grad_norm_zero", max_grad_norm=0),
    plan("run_name_too_long", name="n" * 201),
    plan("run_name_with_nul", name="a\x00"),
    plan("plan_unknown_field", batch_size=256),
    refused("plan_dry_run_maybe", "POST", RUNS, PLAN, ("query", "dry_run"), params=MAYBE, caller=T),
    refused("epoch_dry_run_maybe", "POST", EPOCHS, _NO_BODY, ("query", "dry_run"), params=MAYBE),
    # --- Releases.
    release("gaussian_epsilon_without_delta", None, base=DELTA_FREE),
    release("laplace_with_delta", None, delta=1e-5),
    release("epsilon_and_noise_scale", None, noise_scale=2.0),
    release("neither_epsilon_nor_noise_scale", None, base={"mechanism": "laplace"}),
    release("pure_dp_with_values", None, mechanism="pure_dp", values=[1.0]),
    release("pure_dp_with_noise_scale", None, base={"mechanism": "pure_dp", "noise_scale": 1.0}),
    release("mechanism_unknown", mechanism="exponential"),
    release("release_epsilon_zero", epsilon=0),
    release("release_epsilon_above_max", epsilon=1e5),
    release("release_delta_one", base=DELTA_FREE, delta=1),
    release("sensitivity_zero", sensitivity=0),
    release("sensitivity_negative", sensitivity=-1),
    release("values_too_many", values=[0.0] * 100_001),
    release("values_too_large", ("body", "values", 0), values=[1e301]),
    release("values_not_a_list", values="1,2"),
    release("values_strings", ("body", "values", 0), values=["1"]),
    # Laplace ε = sensitivity / noise_scale: past the ε bound it means nothing, then overflows.
    release(
        "laplace_scale_epsilon_above_max", None, base={"mechanism": "laplace"}, noise_scale=1e-5
    ),
    release("laplace_scale_epsilon_overflows", None, base=LAPLACE_OVERFLOW),
    refused("laplace_overflow_dry_run", "POST", RELEASES, LAPLACE_OVERFLOW, params=DRY, caller=T),
    release(
        "gaussian_scale_too_small", None, base={"mechanism": "gaussian", "noise_scale": 1e-300}
    ),
    refused("release_dry_run_maybe", "POST", RELEASES, RELEASE, ("query", "dry_run"), params=MAYBE),
    # --- Dataset changes, voids, keys.
    cap_change("cap_change_negative", epsilon_cap=-1),
    cap_change("cap_change_huge", epsilon_cap=1e300),
    cap_change("freeze_with_string", frozen="yes"),
    cap_change("freeze_with_number", frozen=1),
    cap_change("change_reason_too_long", "reason", description="d", reason="r" * 501),
    cap_change("change_unknown_field", delta=0.1),
    refused("void_reason_empty", "POST", VOID_AT % "{seq}", {"reason": ""}, "reason"),
    refused("void_reason_missing", "POST", VOID_AT % "{seq}", {}, "reason"),
    refused("void_seq_zero", "POST", VOID_AT % 0, {"reason": "x"}, ("path", "seq")),
    refused("void_seq_word", "POST", VOID_AT % "one", {"reason": "x"}, ("path", "seq")),
    refused("void_seq_past_32_bits", "POST", VOID_AT % 2**31, {"reason": "x"}, ("path", "seq")),
    refused("void_seq_past_64_bits", "POST", VOID_AT % 10**20, {"reason": "x"}, ("path", "seq")),
    case("void_not_a_charge", "POST", VOID_AT % 1, 409, "conflict", body={"reason": "x"}),
    key("key_role_unknown", role="root"),
    key("key_scope_bad_id", ("body", "datasets", 0), datasets=["../x"]),
    key("key_scope_too_many", datasets=["d"] * 1001),
    key("key_scope_missing_dataset", ("body", "datasets", 0), datasets=["never-created"]),
    key("key_name_with_nul", name="\x00"),
    key("key_unknown_field", secret="mine"),
    # --- The planning calculators.
    calculator("calc_sample_rate_zero", sample_rate=0),
    calculator("calc_sample_rate_above_one", sample_rate=1.5),
    calculator("calc_sample_rate_negative", sample_rate=-1),
    calculator("calc_steps_zero", steps=0),
    calculator("calc_steps_negative", steps=-1),
    calculator("calc_steps_1e12", steps=1e12),
    calculator("calc_steps_word", steps="ten"),
    calculator("calc_steps_boolean", steps=True),
    calculator("calc_sigma_zero", noise_multiplier=0),
    calculator("calc_sigma_negative", noise_multiplier=-2),
    calculator("calc_sigma_unbounded_epsilon", None, sample_rate=1, noise_multiplier=1e-200),
    calculator("calc_delta_zero", delta=0),
    calculator("calc_delta_one", delta=1),
    calculator("calc_delta_negative", delta=-0.1),
    calculator("calc_sample_rate_subnormal", sample_rate=5e-324),
    calculator("calc_delta_subnormal", delta=5e-324),
    calculator("calc_unknown_field", orders=[2, 4]),
    refused("calc_target_impossible", "POST", PLAN_SIGMA, IMPOSSIBLE_TARGET, None),
    # 1/sample_rate overflowed, and the σ search ran its series to the term limit: 16 s of CPU.
    refused("calc_target_sample_rate_subnormal", "POST", PLAN_SIGMA, TINY_RATE, "sample_rate"),
    refused(
        "calc_target_zero", "POST", PLAN_SIGMA, {**SIGMA, "target_epsilon": 0}, "target_epsilon"
    ),
    refused(
        "calc_target_and_sigma",
        "POST",
        PLAN_SIGMA,
        {**SIGMA, "noise_multiplier": 1.0},
        "noise_multiplier",
    ),
    # --- Bodies that are not JSON objects, or not JSON at all, or too big.
    malformed("malformed_json", DATASETS, b'{"id": "x", '),
    malformed("trailing_garbage", DATASETS, json.dumps(NEW_DATASET).encode() + b" x"),
    malformed("not_utf8", DATASETS, b'{"id": "\xff"}'),
    malformed("deeply_nested_arrays", DATASETS, b"[" * 100_000 + b"]" * 100_000),
    malformed("deeply_nested_objects", RUNS, NESTED_OBJECTS, caller=T),
    refused("empty_body", "POST", DATASETS, _NO_BODY, ("body",)),
    refused("empty_json_body", "POST", RELEASES, _NO_BODY, ("body",), content=b"", caller=T),
    refused("json_null", "POST", DATASETS, None, ("body",)),
    refused("json_array", "POST", RUNS, [PLAN], ("body",), caller=T),
    refused("json_string", "POST", KEYS, "trainer", ("body",)),
    not_json("text_plain", DATASETS, json.dumps(NEW_DATASET).encode(), "text/plain"),
    not_json("form_encoded", RUNS, FORM, FORM_TYPE, caller=T),
    not_json("xml", KEYS, b"<key role='admin'/>", "application/xml"),
    not_json("no_content_type", RELEASES, json.dumps(RELEASE).encode(), None, caller=T),
    not_json("epoch_body_as_text", EPOCHS, b"next", "text/plain", caller=T),
    not_json("change_as_text", ONE, b"frozen=true", "text/plain"),
    case("body_over_limit", "POST", DATASETS, 413, "payload_too_large", content=HUGE_BODY),
    # --- Idempotency keys that are not 1–255 printable ASCII characters.
    idempotency_key("idempotency_key_256_chars", "POST", RELEASES, RELEASE, "k" * 256),
    idempotency_key("idempotency_key_empty", "POST", RELEASES, RELEASE, ""),
    idempotency_key("idempotency_key_with_space", "POST", RUNS, PLAN, "a b"),
    idempotency_key("idempotency_key_with_tab", "POST", RUNS, PLAN, "a\tb"),
    idempotency_key("idempotency_key_with_control", "POST", EPOCHS, _NO_BODY, "a\x01b"),
    idempotency_key("idempotency_key_with_delete", "POST", DATASETS, NEW_DATASET, "a\x7fb"),
    # --- Paging and filters.
    query("datasets_limit_zero", DATASETS, "limit", "0"),
    query("datasets_limit_huge", DATASETS, "limit", "100000"),
    query("runs_limit_zero", RUNS, "limit", "0"),
    query("runs_status_unknown", RUNS, "status", "paused"),
    query("keys_limit_huge", KEYS, "limit", "100000"),
    query("ledger_limit_zero", LEDGER, "limit", "0"),
    query("ledger_limit_huge", LEDGER, "limit", "100000"),
    query("ledger_limit_word", LEDGER, "limit", "all"),
    query("ledger_after_negative", LEDGER, "after", "-1"),
    query("ledger_after_past_32_bits", LEDGER, "after", str(2**31)),
    query("ledger_after_past_64_bits", LEDGER, "after", str(10**20)),
    query("ledger_kind_unknown", LEDGER, "kind", "refund"),
    query("ledger_format_unknown", LEDGER, "format", "xml"),
    # --- Routes and methods.
    not_found("unknown_route", "GET", "/v1/budgets"),
    not_found("unknown_version", "GET", "/v2/datasets"),
    wrong_method("wrong_method_datasets", "DELETE", DATASETS, "GET", "POST"),
    wrong_method("wrong_method_dataset", "PUT", ONE, "GET", "PATCH"),
    wrong_method("wrong_method_epochs", "GET", EPOCHS, "POST"),
    wrong_method("wrong_method_verify", "POST", LEDGER + "/verify", "GET"),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_request(world: World, case: Case) -> None:
    """The expected problem, never a 5xx; and afterwards nothing has changed."""
    before = world.state(keys=case.path == KEYS)
    response = case.send(world)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == case.status and problem["code"] == case.code
    assert problem["type"] == f"urn:privacy-ledger:problem:{case.code}"
    assert isinstance(problem["title"], str) and isinstance(problem["detail"], str)
    if case.loc is not None:
        places = [tuple(e["loc"][: len(case.loc)]) for e in problem["errors"]]
        assert case.loc in places, problem
    if case.allow:
        allowed = {m.strip() for m in response.headers.get("allow", "").split(",")}
        assert allowed == case.allow, response.headers
    assert world.state(keys=case.path == KEYS) == before
    world.assert_ledger_verifies()


def test_oversized_chunked_body_is_413(world: World) -> None:
    """A body streamed without Content-Length is cut off at the limit with the same 413."""

    def chunks() -> Iterator[bytes]:
        yield b'{"id": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"a" * 65536
        yield b'", "epsilon_cap": 1, "delta": 1e-5}'

    before = world.state()
    response = world.admin.client.post(
        "/v1/datasets",
        content=chunks(),
        headers=world.admin.headers({"content-type": "application/json"}),
    )
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "payload_too_large"
    assert world.state() == before


def _fresh_dataset(world: World, name: str) -> str:
    dataset_id = f"{name}-{uuid.uuid4().hex[:8]}"
    world.admin.create_dataset(dataset_id, 10.0)
    return dataset_id


def test_idempotency_key_with_a_different_body_is_refused(world: World) -> None:
    """Same key, different request: 422 idempotency_conflict, and only the first is charged."""
    dataset_id = _fresh_dataset(world, "idem-conflict")
    path = f"/v1/datasets/{dataset_id}/releases"
    key = {"Idempotency-Key": f"release-{dataset_id}"}  # keys are per API key, not per path
    first = world.trainer.post(path, RELEASE, headers=key)
    assert first.status_code == 201, first.text
    after_first = world.admin.get(f"/v1/datasets/{dataset_id}").json()

    for other_path, body, params in (
        (path, {**RELEASE, "epsilon": 0.2}, {}),  # another body
        (path, RELEASE, {"dry_run": "false"}),  # another query
        (f"/v1/datasets/{dataset_id}/runs", PLAN, {}),  # another operation
    ):
        response = world.trainer.post(other_path, body, headers=key, params=params)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "idempotency_conflict"
        assert "idempotent-replayed" not in response.headers
        assert world.admin.get(f"/v1/datasets/{dataset_id}").json() == after_first
    world.assert_ledger_verifies(dataset_id)


def test_idempotency_key_with_the_same_body_replays_and_charges_once(world: World) -> None:
    """Same key, same request: the first response again (marked replayed), charged once."""
    dataset_id = _fresh_dataset(world, "idem-replay")
    path = f"/v1/datasets/{dataset_id}/releases"
    key = {"Idempotency-Key": f"release-{dataset_id}"}
    first = world.trainer.post(path, RELEASE, headers=key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    charged = world.admin.get(f"/v1/datasets/{dataset_id}").json()
    assert charged["ledger_seq"] == 2 and charged["epsilon_spent"] > 0

    # The same JSON with its members in another order is the same request.
    reordered = json.dumps(dict(reversed(list(RELEASE.items())))).encode()
    for replay in (
        world.trainer.post(path, RELEASE, headers=key),
        world.trainer.client.post(
            path,
            content=reordered,
            headers=world.trainer.headers({**key, "content-type": "application/json"}),
        ),
    ):
        assert replay.status_code == 201, replay.text
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == first.json()
    assert world.admin.get(f"/v1/datasets/{dataset_id}").json() == charged

    # An epoch: retried with its key, the run is charged one epoch, not two.
    run = world.trainer.post(f"/v1/datasets/{dataset_id}/runs", PLAN)
    assert run.status_code == 201, run.text
    epoch_key = {"Idempotency-Key": f"epoch-{dataset_id}"}
    epochs = [
        world.trainer.post(f"/v1/runs/{run.json()['id']}/epochs", headers=epoch_key)
        for _ in range(2)
    ]
    assert [e.status_code for e in epochs] == [201, 201]
    assert epochs[1].headers["idempotent-replayed"] == "true"
    assert epochs[0].json() == epochs[1].json() and epochs[0].json()["epoch"] == 1
    assert world.admin.get(f"/v1/runs/{run.json()['id']}").json()["epochs_charged"] == 1
    world.assert_ledger_verifies(dataset_id)


@pytest.mark.parametrize("export", ["csv", "export"])
def test_export_with_an_unstorable_filter_is_never_cut_short(world: World, export: str) -> None:
    """A run_id filter no run can have (a NUL character) is refused or matches nothing; it never
    yields a 200 whose streamed document breaks off (PostgreSQL refuses the value mid-stream)."""
    response = world.admin.get(
        f"/v1/datasets/{DATASET}/ledger", params={"format": export, "run_id": "run_\x00"}
    )
    if response.status_code != 200:
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "validation_error"
    elif export == "csv":
        lines = response.text.splitlines()
        assert len(lines) == 1 and lines[0].startswith("seq,created_at,kind,"), response.text
    else:
        assert response.json() == {"data": [], "has_more": False}
    world.assert_ledger_verifies()
