"""An in-memory stand-in for the ledger's run endpoints, served through httpx.MockTransport.

It implements just enough of docs/api.md (run plan, epochs, complete, abort,
get run, dataset, ledger pages) to check what the client sends and how it
reacts, and records every request it sees.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from trainer_client import AsyncLedgerClient, LedgerClient
from trainer_client.models import Dataset, Effect, Epoch

DATASET = "mnist"
RUN_PATH = re.compile(r"/runs/run_\w+")
TIME = "2026-11-23T09:30:00.123456Z"


def problem(status: int, code: str, detail: str = "refused", **extra: Any) -> httpx.Response:
    """A problem+json answer."""
    body = {
        "type": f"urn:privacy-ledger:problem:{code}",
        "title": code.replace("_", " ").capitalize(),
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


def dataset_body(**changes: Any) -> dict[str, Any]:
    """A Dataset body."""
    body: dict[str, Any] = {
        "id": DATASET,
        "description": "",
        "epsilon_cap": 8.0,
        "delta": 1e-5,
        "epsilon_spent": 0.0,
        "epsilon_reserved": 0.0,
        "epsilon_remaining": 8.0,
        "frozen": False,
        "ledger_seq": 1,
        "active_runs": 0,
        "created_at": TIME,
        "updated_at": TIME,
        "shares": {
            "profile": "uniform",
            "orders": [2.0, 8.0],
            "weights": ["1/2", "1/2"],
            "pure_sum": True,
            "plan": None,
        },
        "epsilon_decided_by": None,
        "outside_guarantee": None,
    }
    body.update(changes)
    return body


def effect_body(before: float = 0.0, after: float = 0.1) -> dict[str, Any]:
    """An admission's Effect body."""
    return {
        "epsilon": after - before,
        "epsilon_spent_before": before,
        "epsilon_spent_after": after,
        "epsilon_reserved_before": before,
        "epsilon_reserved_after": after,
    }


def make_epoch(
    noise_multiplier: float = 1.0,
    *,
    index: int = 1,
    sample_rate: float = 0.1,
    steps: int = 10,
    max_grad_norm: float | None = 1.0,
    sampling: str = "poisson",
    dataset: dict[str, Any] | None = None,
) -> Epoch:
    """An Epoch as the ledger would hand it out, for tests of the helpers that use one."""
    return Epoch(
        run_id="run_1",
        index=index,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=max_grad_norm,
        sampling=sampling,
        beyond_plan=False,
        ledger_seq=3,
        expires_at=datetime.fromisoformat(TIME),
        dataset=Dataset.from_json(dataset or dataset_body()),
        effect=Effect.from_json(effect_body()),
    )


def entry_body(seq: int, kind: str = "charge") -> dict[str, Any]:
    """A ledger Entry body."""
    return {
        "seq": seq,
        "dataset_id": DATASET,
        "kind": kind,
        "run_id": None,
        "release_id": None,
        "voids_seq": None,
        "mechanism": None,
        "actor": "bootstrap",
        "idempotency_key": None,
        "epsilon": 0.1,
        "epsilon_spent_after": 0.1 * seq,
        "epsilon_reserved_after": 0.1 * seq,
        "details": {},
        "created_at": TIME,
        "prev_hash": "0" * 64,
        "hash": f"{seq:064x}",
    }


@dataclass
class FakeRun:
    """One run's state in the fake."""

    id: str
    epochs: int
    status: str = "active"
    epochs_charged: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset_id": DATASET,
            "name": None,
            "status": self.status,
            "sampling": "poisson",
            "sample_rate": 0.01,
            "steps_per_epoch": 100,
            "epochs": self.epochs,
            "epochs_charged": self.epochs_charged,
            "noise_multiplier": 1.1,
            "max_grad_norm": 1.0,
            "target_epsilon": 3.0,
            "epsilon": 2.99,
            "epsilon_per_epoch": 0.8,
            "lease_seconds": 3600,
            "expires_at": TIME,
            "created_at": TIME,
            "updated_at": TIME,
        }


@dataclass
class FakeLedger:
    """The fake service. `admit_epochs` caps how many epochs a run may charge in total
    (the next one is refused with budget_exhausted); `expire_after` makes the run
    expire after that many epochs (the next one gets run_not_active)."""

    admit_epochs: int | None = None
    expire_after: int | None = None
    ledger_entries: int = 0
    requests: list[httpx.Request] = field(default_factory=list)
    runs: dict[str, FakeRun] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> LedgerClient:
        """A sync client wired to this fake."""
        return LedgerClient(
            "http://ledger.test", "pl_test_key", transport=self.transport(), **kwargs
        )

    def async_client(self, **kwargs: Any) -> AsyncLedgerClient:
        """An async client wired to this fake."""
        return AsyncLedgerClient(
            "http://ledger.test", "pl_test_key", transport=self.transport(), **kwargs
        )

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def calls(self) -> list[str]:
        """The requests seen, as "METHOD /path" with run ids replaced by "{run}"."""
        return [f"{r.method} {RUN_PATH.sub('/runs/{run}', r.url.path)}" for r in self.requests]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if method == "POST" and path == f"/v1/datasets/{DATASET}/runs":
            plan = json.loads(request.content)
            run = FakeRun(id=f"run_{len(self.runs) + 1}", epochs=int(plan["epochs"]))
            self.runs[run.id] = run
            return httpx.Response(201, json={**run.body(), "dataset": dataset_body()})
        if path == f"/v1/datasets/{DATASET}":
            return httpx.Response(200, json=dataset_body())
        if path == f"/v1/datasets/{DATASET}/ledger":
            return self.ledger_page(request)
        match = re.fullmatch(r"/v1/runs/(\w+)(?:/(\w+))?", path)
        if match is None or match.group(1) not in self.runs:
            return problem(404, "not_found", f"no such resource: {path}")
        run = self.runs[match.group(1)]
        action = match.group(2)
        if method == "GET" and action is None:
            return httpx.Response(200, json=run.body())
        if method == "POST" and action == "epochs":
            return self.epoch(run)
        if method == "POST" and action in ("complete", "abort"):
            if run.status != "active":
                return problem(409, "run_not_active", f"run is {run.status}")
            run.status = "completed" if action == "complete" else "aborted"
            return httpx.Response(200, json={**run.body(), "dataset": dataset_body()})
        return problem(404, "not_found", f"no route {method} {path}")

    def epoch(self, run: FakeRun) -> httpx.Response:
        if self.expire_after is not None and run.epochs_charged >= self.expire_after:
            run.status = "expired"
        if run.status != "active":
            return problem(409, "run_not_active", f"run is {run.status}")
        if self.admit_epochs is not None and run.epochs_charged >= self.admit_epochs:
            return problem(
                409,
                "budget_exhausted",
                "does not fit",
                epsilon_cap=8.0,
                epsilon_spent=7.9,
                epsilon_reserved=7.9,
                epsilon_requested=0.8,
                epsilon_after=8.3,
            )
        run.epochs_charged += 1
        body = {
            "run_id": run.id,
            "epoch": run.epochs_charged,
            "noise_multiplier": 1.1,
            "sample_rate": 0.01,
            "steps": 100,
            "max_grad_norm": 1.0,
            "sampling": "poisson",
            "beyond_plan": run.epochs_charged > run.epochs,
            "ledger_seq": 10 + run.epochs_charged,
            "expires_at": TIME,
            "dataset": dataset_body(epsilon_spent=0.8 * run.epochs_charged),
            "effect": effect_body(0.8 * (run.epochs_charged - 1), 0.8 * run.epochs_charged),
        }
        return httpx.Response(201, json=body)

    def ledger_page(self, request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params["limit"])
        after = int(request.url.params.get("after", "0"))
        last = min(after + limit, self.ledger_entries)
        data = [entry_body(seq) for seq in range(after + 1, last + 1)]
        return httpx.Response(200, json={"data": data, "has_more": last < self.ledger_entries})
