"""Every API call of docs/api.md as data (`Call`, a listing as `Pages`), for both clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainer_client._http import Call, Pages, segment


def _fields(**fields: Any) -> dict[str, Any]:
    """A JSON body of the fields that were given (None means "not sent", not null)."""
    return {name: value for name, value in fields.items() if value is not None}


def _dry(dry_run: bool) -> dict[str, str | int | float | bool | None]:
    return {"dry_run": True} if dry_run else {}


# Datasets -------------------------------------------------------------------------------


def create_dataset(
    dataset_id: str,
    *,
    epsilon_cap: float,
    delta: float,
    description: str | None,
    idempotency_key: str | None,
    shares: Mapping[str, Any] | None = None,
) -> Call:
    """POST /v1/datasets."""
    body = _fields(
        id=dataset_id,
        epsilon_cap=epsilon_cap,
        delta=delta,
        description=description,
        shares=dict(shares) if shares is not None else None,
    )
    return Call("POST", "/v1/datasets", body=body, idempotency_key=idempotency_key)


def get_dataset(dataset_id: str) -> Call:
    """GET /v1/datasets/{id}."""
    return Call("GET", f"/v1/datasets/{segment(dataset_id)}")


def list_datasets(*, limit: int) -> Pages:
    """GET /v1/datasets, page by page (cursor: the last dataset's id)."""
    return Pages(
        lambda after: Call("GET", "/v1/datasets", params={"limit": limit, "after": after}), "id"
    )


def update_dataset(
    dataset_id: str,
    *,
    epsilon_cap: float | None,
    frozen: bool | None,
    description: str | None,
    reason: str | None,
) -> Call:
    """PATCH /v1/datasets/{id}."""
    body = _fields(epsilon_cap=epsilon_cap, frozen=frozen, description=description, reason=reason)
    return Call("PATCH", f"/v1/datasets/{segment(dataset_id)}", body=body)


# Runs ------------------------------------------------------------------------------------


def create_run(
    dataset_id: str,
    *,
    sample_rate: float,
    steps_per_epoch: int,
    epochs: int,
    target_epsilon: float | None,
    noise_multiplier: float | None,
    sampling: str,
    max_grad_norm: float | None,
    name: str | None,
    lease_seconds: int | None,
    dry_run: bool,
    idempotency_key: str | None,
) -> Call:
    """POST /v1/datasets/{id}/runs."""
    body = _fields(
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier,
        sampling=sampling,
        max_grad_norm=max_grad_norm,
        name=name,
        lease_seconds=lease_seconds,
    )
    return Call(
        "POST",
        f"/v1/datasets/{segment(dataset_id)}/runs",
        params=_dry(dry_run),
        body=body,
        idempotency_key=idempotency_key,
    )


def get_run(run_id: str) -> Call:
    """GET /v1/runs/{run_id}."""
    return Call("GET", f"/v1/runs/{segment(run_id)}")


def list_runs(dataset_id: str, *, status: str | None, limit: int) -> Pages:
    """GET /v1/datasets/{id}/runs, page by page (cursor: the last run's id)."""
    path = f"/v1/datasets/{segment(dataset_id)}/runs"
    return Pages(
        lambda after: Call("GET", path, params={"status": status, "limit": limit, "after": after}),
        "id",
    )


def reserve_epoch(run_id: str, *, dry_run: bool, idempotency_key: str | None) -> Call:
    """POST /v1/runs/{run_id}/epochs (empty body)."""
    return Call(
        "POST",
        f"/v1/runs/{segment(run_id)}/epochs",
        params=_dry(dry_run),
        idempotency_key=idempotency_key,
    )


def finish_run(run_id: str, how: str, *, idempotency_key: str | None) -> Call:
    """POST /v1/runs/{run_id}/complete or /abort (empty body)."""
    if how not in ("complete", "abort"):
        raise ValueError(f"a run is finished by 'complete' or 'abort', not {how!r}")
    return Call("POST", f"/v1/runs/{segment(run_id)}/{how}", idempotency_key=idempotency_key)


# Releases --------------------------------------------------------------------------------


def create_release(
    dataset_id: str,
    *,
    mechanism: str,
    sensitivity: float,
    epsilon: float | None,
    delta: float | None,
    noise_scale: float | None,
    values: Sequence[float] | None,
    name: str | None,
    dry_run: bool,
    idempotency_key: str | None,
    count: int = 1,
    batch: Sequence[Sequence[float]] | None = None,
) -> Call:
    """POST /v1/datasets/{id}/releases (one release, `count` of them, or one per `batch` vector)."""
    body = _fields(
        mechanism=mechanism,
        sensitivity=sensitivity,
        epsilon=epsilon,
        delta=delta,
        noise_scale=noise_scale,
        values=None if values is None else [float(v) for v in values],
        batch=None if batch is None else [[float(v) for v in vector] for vector in batch],
        count=None if count == 1 else count,
        name=name,
    )
    return Call(
        "POST",
        f"/v1/datasets/{segment(dataset_id)}/releases",
        params=_dry(dry_run),
        body=body,
        idempotency_key=idempotency_key,
    )


def private_argmax(
    dataset_id: str,
    votes: Sequence[Sequence[int]],
    *,
    teachers: int,
    epsilon: float | None,
    delta: float | None,
    noise_scale: float | None,
    name: str | None,
    idempotency_key: str | None,
) -> Call:
    """POST /v1/datasets/{id}/releases with ``mechanism: noisy_argmax`` (K vote histograms)."""
    body = _fields(
        mechanism="noisy_argmax",
        teachers=teachers,
        votes=[[int(count) for count in histogram] for histogram in votes],
        epsilon=epsilon,
        delta=delta,
        noise_scale=noise_scale,
        name=name,
    )
    return Call(
        "POST",
        f"/v1/datasets/{segment(dataset_id)}/releases",
        body=body,
        idempotency_key=idempotency_key,
    )


# Ledger ----------------------------------------------------------------------------------


def list_ledger(
    dataset_id: str, *, kind: str | None, run_id: str | None, limit: int, after: int | None
) -> Pages:
    """GET /v1/datasets/{id}/ledger, page by page from `after` (cursor: the last entry's seq)."""

    def call_after(cursor: int | None) -> Call:
        start = after if cursor is None else cursor
        return Call(
            "GET",
            f"/v1/datasets/{segment(dataset_id)}/ledger",
            params={"kind": kind, "run_id": run_id, "limit": limit, "after": start},
        )

    return Pages(call_after, "seq")


def ledger_csv(dataset_id: str, *, kind: str | None, run_id: str | None) -> Call:
    """GET /v1/datasets/{id}/ledger/csv (every matching entry)."""
    return Call(
        "GET",
        f"/v1/datasets/{segment(dataset_id)}/ledger/csv",
        params={"kind": kind, "run_id": run_id},
        accept="text/csv",
    )


def ledger_export(dataset_id: str, *, kind: str | None, run_id: str | None) -> Call:
    """GET /v1/datasets/{id}/ledger?format=export (every matching entry, one JSON document)."""
    return Call(
        "GET",
        f"/v1/datasets/{segment(dataset_id)}/ledger",
        params={"kind": kind, "run_id": run_id, "format": "export"},
    )


def verify_ledger(dataset_id: str) -> Call:
    """GET /v1/datasets/{id}/ledger/verify."""
    return Call("GET", f"/v1/datasets/{segment(dataset_id)}/ledger/verify")


def void_entry(dataset_id: str, seq: int, *, reason: str, idempotency_key: str | None) -> Call:
    """POST /v1/datasets/{id}/ledger/{seq}/void."""
    return Call(
        "POST",
        f"/v1/datasets/{segment(dataset_id)}/ledger/{int(seq)}/void",
        body={"reason": reason},
        idempotency_key=idempotency_key,
    )


# Keys ------------------------------------------------------------------------------------


def create_key(
    role: str, *, datasets: Sequence[str] | None, name: str | None, idempotency_key: str | None
) -> Call:
    """POST /v1/keys."""
    body = _fields(role=role, datasets=None if datasets is None else list(datasets), name=name)
    return Call("POST", "/v1/keys", body=body, idempotency_key=idempotency_key)


def list_keys(*, limit: int) -> Pages:
    """GET /v1/keys, page by page (cursor: the last key's id)."""
    return Pages(
        lambda after: Call("GET", "/v1/keys", params={"limit": limit, "after": after}), "id"
    )


def revoke_key(key_id: str) -> Call:
    """DELETE /v1/keys/{id}."""
    return Call("DELETE", f"/v1/keys/{segment(key_id)}")


# Accountant ------------------------------------------------------------------------------


def epsilon(*, sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> Call:
    """POST /v1/accountant/epsilon (a calculation: its Idempotency-Key is always a fresh one)."""
    body = {
        "sample_rate": sample_rate,
        "noise_multiplier": noise_multiplier,
        "steps": steps,
        "delta": delta,
    }
    return Call("POST", "/v1/accountant/epsilon", body=body)


def noise_multiplier(
    *, sample_rate: float, steps: int, target_epsilon: float, delta: float
) -> Call:
    """POST /v1/accountant/noise-multiplier (a calculation, like `epsilon`)."""
    body = {
        "sample_rate": sample_rate,
        "steps": steps,
        "target_epsilon": target_epsilon,
        "delta": delta,
    }
    return Call("POST", "/v1/accountant/noise-multiplier", body=body)
