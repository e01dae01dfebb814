"""Domain results → response bodies (plain JSON-ready dicts)."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

from service.domain.datasets import DatasetChanged, DatasetCreated, DatasetView, Voided
from service.domain.keys import KeyIssued, ShownKey
from service.domain.ledger import Effect, iso
from service.domain.releases import ReleaseResult
from service.domain.run_pld import stored
from service.domain.runs import EpochResult, Finished, Planned, RunResult
from service.storage.models import ApiKey, LedgerEntry, Run

Body = dict[str, Any]


def _time(moment: datetime | None) -> str | None:
    return iso(moment) if moment is not None else None


def dataset(view: DatasetView) -> Body:
    """A dataset."""
    return {
        "id": view.id,
        "description": view.description,
        "epsilon_cap": view.epsilon_cap,
        "delta": view.delta,
        "epsilon_spent": view.epsilon_spent,
        "epsilon_reserved": view.epsilon_reserved,
        "epsilon_remaining": view.epsilon_remaining,
        "frozen": view.frozen,
        "ledger_seq": view.ledger_seq,
        "active_runs": view.active_runs,
        "created_at": iso(view.created_at),
        "updated_at": iso(view.updated_at),
        "shares": view.shares,
        "epsilon_decided_by": view.epsilon_decided_by,
        "outside_guarantee": view.outside_guarantee,
    }


def effect(moved: Effect | None) -> Body | None:
    """How far an entry moved its dataset's ε."""
    if moved is None:
        return None
    return {
        "epsilon": moved.epsilon,
        "epsilon_spent_before": moved.epsilon_spent_before,
        "epsilon_spent_after": moved.epsilon_spent_after,
        "epsilon_reserved_before": moved.epsilon_reserved_before,
        "epsilon_reserved_after": moved.epsilon_reserved_after,
    }


def run(row: Run) -> Body:
    """A run (its PLD ε as stored: rendering never computes it, since it may run under a lock)."""
    pld = stored(row)
    return {
        "id": row.id,
        "dataset_id": row.dataset_id,
        "name": row.name,
        "status": row.status,
        "sampling": row.sampling,
        "sample_rate": row.sample_rate,
        "steps_per_epoch": row.steps_per_epoch,
        "epochs": row.epochs,
        "epochs_charged": row.epochs_charged,
        "noise_multiplier": row.noise_multiplier,
        "max_grad_norm": row.max_grad_norm,
        "target_epsilon": row.target_epsilon,
        "epsilon": row.epsilon,
        "epsilon_per_epoch": row.epsilon_per_epoch,
        "epsilon_pld": pld.epsilon,
        "epsilon_pld_note": pld.note,
        "lease_seconds": row.lease_seconds,
        "expires_at": iso(row.expires_at),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def run_result(result: RunResult) -> Body:
    """A run with its dataset after the operation."""
    return {**run(result.run), "dataset": dataset(result.dataset), "effect": effect(result.effect)}


def epoch(result: EpochResult) -> Body:
    """A charged epoch."""
    return {
        "run_id": result.run.id,
        "epoch": result.epoch,
        "noise_multiplier": result.run.noise_multiplier,
        "sample_rate": result.run.sample_rate,
        "steps": result.run.steps_per_epoch,
        "max_grad_norm": result.run.max_grad_norm,
        "sampling": result.run.sampling,
        "beyond_plan": result.beyond_plan,
        "ledger_seq": result.ledger_seq,
        "expires_at": iso(result.run.expires_at),
        "dataset": dataset(result.dataset),
        "effect": effect(result.effect),
    }


def release(result: ReleaseResult) -> Body:
    """A release."""
    row = result.release
    return {
        "id": row.id,
        "dataset_id": row.dataset_id,
        "mechanism": row.mechanism,
        "sensitivity": row.sensitivity,
        "noise_scale": row.noise_scale,
        "epsilon": row.epsilon,
        "delta": row.delta,
        "name": row.name,
        "ledger_seq": row.ledger_seq,
        "noised_values": result.noised_values,
        "noise": result.noise,
        "count": result.count,
        "noised_batch": result.noised_batch,
        "labels": result.labels,
        "created_at": iso(row.created_at),
        "dataset": dataset(result.dataset),
        "effect": effect(result.effect),
    }


def entry(row: LedgerEntry) -> Body:
    """A ledger entry, with every field its hash covers."""
    return {
        "seq": row.seq,
        "dataset_id": row.dataset_id,
        "kind": row.kind,
        "run_id": row.run_id,
        "release_id": row.release_id,
        "voids_seq": row.voids_seq,
        "mechanism": json.loads(row.mechanism) if row.mechanism else None,
        "units": json.loads(row.units) if row.units else None,
        "actor": row.actor,
        "actor_name": row.actor_name,
        "actor_role": row.actor_role,
        "idempotency_key": row.idempotency_key,
        "epsilon": row.epsilon,
        "pure": row.pure,
        "epsilon_spent_before": row.epsilon_spent_before,
        "epsilon_spent_after": row.epsilon_spent_after,
        "epsilon_reserved_before": row.epsilon_reserved_before,
        "epsilon_reserved_after": row.epsilon_reserved_after,
        "details": json.loads(row.details),
        "created_at": row.created_at,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


def key(row: ApiKey) -> Body:
    """An API key's metadata (never its secret)."""
    return {
        "id": row.id,
        "role": row.role,
        "datasets": json.loads(row.datasets) if row.datasets is not None else None,
        "name": row.name,
        "created_at": iso(row.created_at),
        "revoked_at": _time(row.revoked_at),
    }


def shown_key(shown: ShownKey) -> Body:
    """A key as one caller may see it (its scope cut to the caller's)."""
    return {**key(shown.key), "datasets": shown.datasets}


def key_issued(issued: KeyIssued) -> Body:
    """A new key with its bearer secret (this answer only)."""
    return {**key(issued.key), "key": issued.token}


# Each result of a write: its status and body.
_ANSWERS: dict[type, tuple[int, Any]] = {
    Planned: (201, run_result),
    Finished: (200, run_result),
    EpochResult: (201, epoch),
    ReleaseResult: (201, release),
    DatasetCreated: (201, lambda r: dataset(r.dataset)),
    DatasetChanged: (200, lambda r: dataset(r.dataset)),
    Voided: (201, lambda r: entry(r.entry)),
    KeyIssued: (201, key_issued),
}


def answer(result: object) -> tuple[int, Body]:
    """The status and body of a write's result."""
    status, shape = _ANSWERS[type(result)]
    return status, shape(result)


# Results recorded under the lock and not yet answered: the response reuses the record's text
# (`first_answer`) rather than rendering the result again. Keyed by the result's id, holding the
# result so that the id cannot be reused meanwhile; a result that is never answered (its batch
# failed to commit) is dropped with the oldest.
_RECORDED: OrderedDict[int, tuple[object, int, str]] = OrderedDict()
_RECORDED_LOCK = threading.Lock()
_RECORDED_KEPT = 1024


def recorded(result: object) -> tuple[int, str]:
    """What an Idempotency-Key's record keeps of a result, to replay it: status and JSON."""
    status, body = answer(result)
    # Exactly as JSONResponse renders the first answer, so a replay is the same bytes.
    text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    with _RECORDED_LOCK:
        _RECORDED[id(result)] = (result, status, text)
        while len(_RECORDED) > _RECORDED_KEPT:
            _RECORDED.popitem(last=False)
    return status, text


def first_answer(result: object) -> tuple[int, str] | None:
    """The status and JSON text `recorded` made of this very result (once), or None."""
    with _RECORDED_LOCK:
        kept = _RECORDED.pop(id(result), None)
    if kept is None or kept[0] is not result:
        return None
    return kept[1], kept[2]
