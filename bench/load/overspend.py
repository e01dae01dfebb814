"""The overspend check after each load run: the cap held, and the ledger is what was answered.

It fetches, with the admin key, every dataset's figures, its chain's verdict and its entries,
then judges them against what the client was answered:

- every chain verifies (`GET …/ledger/verify`);
- no figure the service reports (the dataset's spent, reserved and remaining ε; every entry's
  ε before and after) is NaN, negative or above the cap the dataset was created with;
- the admitted plans, charges (epochs + releases) and completions equal the ledger's `hold`,
  `charge` and `release_hold` entries, and no other entry appeared;
- no request was answered 5xx;
- under a workload meant to reach the cap, every dataset reached it (refused a release).

`judge` is a pure function of the fetched ledgers and the load, so it is unit-tested on its own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.load.client import Load
from bench.load.servers import Server, admin_client
from bench.load.workloads import Workload

_DATASET_FIGURES = ("epsilon_spent", "epsilon_reserved", "epsilon_remaining")
_ENTRY_FIGURES = (
    "epsilon_spent_before",
    "epsilon_spent_after",
    "epsilon_reserved_before",
    "epsilon_reserved_after",
)
# The entries the trainer mix writes (admitted count -> entry kind), and the dataset's first.
ADMITTED_AS = (("plans", "hold"), ("charges", "charge"), ("completions", "release_hold"))
_EXPECTED_KINDS = {"dataset_created", *(kind for _, kind in ADMITTED_AS)}


@dataclass(frozen=True)
class DatasetLedger:
    """One dataset as the service reports it after the run."""

    dataset: dict[str, Any]  # GET /v1/datasets/{id}
    verification: dict[str, Any]  # GET …/ledger/verify
    entries: list[dict[str, Any]]  # GET …/ledger?format=export


def fetch(server: Server, dataset_ids: Sequence[str]) -> list[DatasetLedger]:
    """Every dataset's figures, chain verdict and entries, read with the admin key."""
    ledgers = []
    with admin_client(server) as http:
        for dataset_id in dataset_ids:
            path = f"/v1/datasets/{dataset_id}"
            dataset = http.get(path).raise_for_status().json()
            verification = http.get(f"{path}/ledger/verify").raise_for_status().json()
            export = http.get(f"{path}/ledger", params={"format": "export"})
            entries = export.raise_for_status().json()["data"]
            ledgers.append(DatasetLedger(dataset, verification, entries))
    return ledgers


def _figure_problem(where: str, name: str, value: Any, cap: float) -> str | None:
    if not isinstance(value, int | float) or math.isnan(value) or value < 0:
        return f"{where}: {name} is {value!r}"
    if value > cap:
        return f"{where}: {name} {value:g} above the cap {cap:g}"
    return None


def judge(ledgers: Sequence[DatasetLedger], load: Load, workload: Workload) -> list[str]:
    """The check's problems (none: the cap held and the ledger matches the answers)."""
    problems: list[str] = []
    kinds: Counter[str] = Counter()
    cap = workload.epsilon_cap
    for ledger in ledgers:
        dataset_id = ledger.dataset["id"]
        if ledger.dataset["epsilon_cap"] != cap:
            problems.append(f"{dataset_id}: cap {ledger.dataset['epsilon_cap']} is not {cap:g}")
        if not ledger.verification["ok"]:
            found = ledger.verification.get("problems", [])[:2]
            problems.append(f"{dataset_id}: chain does not verify: {found}")
        figures = [(dataset_id, name, ledger.dataset[name]) for name in _DATASET_FIGURES]
        for entry in ledger.entries:
            kinds[entry["kind"]] += 1
            where = f"{dataset_id} entry {entry['seq']}"
            figures += [(where, n, entry[n]) for n in _ENTRY_FIGURES if entry[n] is not None]
        problems += [p for f in figures if (p := _figure_problem(*f, cap)) is not None]
    for attribute, kind in ADMITTED_AS:
        admitted = getattr(load, attribute)
        if kinds[kind] != admitted:
            problems.append(f"{admitted} {attribute} admitted but {kinds[kind]} {kind} entries")
    unexpected = sorted(set(kinds) - _EXPECTED_KINDS)
    if unexpected:
        problems.append(f"unexpected entries: {', '.join(unexpected)}")
    if load.server_errors:
        problems.append(f"{load.server_errors} answers 5xx")
    missed = [ledger.dataset["id"] for ledger in ledgers if ledger.dataset["id"] not in load.at_cap]
    if workload.reaches_cap and missed:
        problems.append(
            f"the cap was never reached on {len(missed)} of {len(ledgers)} datasets "
            f"(no release refused with budget_exhausted)"
        )
    return problems


def audit(server: Server, dataset_ids: Sequence[str], load: Load, workload: Workload) -> list[str]:
    """The overspend check on a server after a load run."""
    return judge(fetch(server, dataset_ids), load, workload)
