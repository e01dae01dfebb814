"""bench.load's overspend check can fail: on a made-up ledger and on one a real server wrote.

The checker is what turns a load run into "the cap held": if it cannot see an ε above the
cap, a lost charge or a 5xx, every "ok" in docs/benchmarks.md means nothing. So each way the
service could be wrong is planted, one at a time, in a ledger that otherwise passes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.load.__main__ import configurations, parse_args
from bench.load.client import Cpu, Load
from bench.load.overspend import DatasetLedger, fetch, judge
from bench.load.servers import ledger_server
from bench.load.workloads import CAPPED, HEADROOM, Workload, drive, prepare

CAP = CAPPED.epsilon_cap


def _entry(seq: int, kind: str, spent: float, reserved: float) -> dict[str, Any]:
    return {
        "seq": seq,
        "kind": kind,
        "epsilon_spent_before": None if seq == 1 else spent,
        "epsilon_spent_after": spent,
        "epsilon_reserved_before": None if seq == 1 else reserved,
        "epsilon_reserved_after": reserved,
    }


def _ledger(dataset_id: str = "d", cap: float = CAP) -> DatasetLedger:
    """A dataset after one run planned, two epochs charged, one release and the completion."""
    entries = [
        _entry(1, "dataset_created", 0.0, 0.0),
        _entry(2, "hold", 0.0, 1.2),
        _entry(3, "charge", 0.8, 1.2),
        _entry(4, "charge", 1.2, 1.2),
        _entry(5, "charge", 1.9, 1.9),
        _entry(6, "release_hold", 1.9, 1.9),
    ]
    dataset = {
        "id": dataset_id,
        "epsilon_cap": cap,
        "epsilon_spent": 1.9,
        "epsilon_reserved": 1.9,
        "epsilon_remaining": cap - 1.9,
    }
    return DatasetLedger(dataset, {"ok": True, "problems": []}, entries)


def _load(**changes: Any) -> Load:
    load = Load(
        seconds=1.0, admitted=4, latencies=[0.01, 0.02], refused=3, server_errors=0,
        failures=0, plans=1, charges=3, completions=1, cpu=Cpu(0.0, 0.0, 0.0),
        at_cap=frozenset({"d"}),
    )  # fmt: skip
    return replace(load, **changes)


def test_a_ledger_that_matches_its_answers_passes() -> None:
    assert judge([_ledger()], _load(), CAPPED) == []


_WRONG = [
    (CAP * (1 + 1e-12), "above the cap"),
    (CAP + 1, "above the cap"),
    (math.nan, "is nan"),
    (-1e-9, "is -1e-09"),
]
_DATASET_FIGURES = ["epsilon_spent", "epsilon_reserved", "epsilon_remaining"]


@pytest.mark.parametrize(("value", "said"), [*_WRONG, (None, "is None")])
@pytest.mark.parametrize("figure", _DATASET_FIGURES)
def test_a_dataset_figure_above_the_cap_nan_negative_or_missing_fails(
    figure: str, value: Any, said: str
) -> None:
    ledger = copy.deepcopy(_ledger())
    ledger.dataset[figure] = value
    (problem,) = judge([ledger], _load(), CAPPED)
    assert problem.startswith(f"d: {figure}") and said in problem


@pytest.mark.parametrize(("value", "said"), _WRONG)
@pytest.mark.parametrize("figure", ["epsilon_spent_after", "epsilon_reserved_before"])
def test_an_entry_figure_above_the_cap_nan_or_negative_fails(
    figure: str, value: float, said: str
) -> None:
    ledger = copy.deepcopy(_ledger())
    ledger.entries[4][figure] = value
    (problem,) = judge([ledger], _load(), CAPPED)
    assert problem.startswith(f"d entry 5: {figure}") and said in problem


def test_the_cap_at_exactly_its_value_passes() -> None:
    ledger = copy.deepcopy(_ledger())
    ledger.entries[4]["epsilon_spent_after"] = CAP
    assert judge([ledger], _load(), CAPPED) == []


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"charges": 4}, "4 charges admitted but 3 charge entries"),
        ({"charges": 2}, "2 charges admitted but 3 charge entries"),
        ({"plans": 0}, "0 plans admitted but 1 hold entries"),
        ({"completions": 2}, "2 completions admitted but 1 release_hold entries"),
        ({"server_errors": 1}, "1 answers 5xx"),
    ],
)
def test_answers_the_ledger_does_not_hold_fail(changes: dict[str, int], said: str) -> None:
    assert judge([_ledger()], _load(**changes), CAPPED) == [said]


def test_a_chain_that_does_not_verify_fails() -> None:
    ledger = replace(_ledger(), verification={"ok": False, "problems": ["seq 4: hash mismatch"]})
    (problem,) = judge([ledger], _load(), CAPPED)
    assert "chain does not verify" in problem and "seq 4" in problem


def test_an_entry_nobody_asked_for_fails() -> None:
    ledger = copy.deepcopy(_ledger())
    ledger.entries.append(_entry(7, "expire", 1.9, 1.9))
    assert judge([ledger], _load(), CAPPED) == ["unexpected entries: expire"]


def test_a_dataset_created_with_another_cap_fails() -> None:
    (problem,) = judge([_ledger(cap=3.0)], _load(), CAPPED)
    assert "is not 2" in problem


def test_a_capped_run_that_never_reached_the_cap_fails_but_headroom_need_not() -> None:
    untouched = _load(refused=0, at_cap=frozenset())
    assert judge([_ledger(cap=HEADROOM.epsilon_cap)], untouched, HEADROOM) == []
    (problem,) = judge([_ledger()], untouched, CAPPED)
    assert problem.startswith("the cap was never reached on 1 of 1 datasets")
    (problem,) = judge([_ledger("d"), _ledger("e")], replace(_load(), charges=6, plans=2,
                       completions=2), CAPPED)  # fmt: skip
    assert problem.startswith("the cap was never reached on 1 of 2 datasets")


def test_quick_keeps_its_options_and_capped_runs_use_the_most_clients() -> None:
    args = parse_args(["--quick", "--clients", "8,64", "--datasets", "1,16"])
    assert (args.duration, args.warmup, args.growth_sizes) == (2.0, 0.5, (100, 1_000))
    assert parse_args(["--quick"]).datasets == [4] and parse_args([]).datasets == [1, 16]
    found = configurations(args, ["sqlite"], workers=1)
    capped = [c for c in found if c.workload is CAPPED]
    assert [(c.datasets, c.clients) for c in capped] == [(1, 64), (16, 64)]
    assert len(found) == 2 * 2 + 2
    assert all(c.workload is HEADROOM for c in configurations(
        parse_args(["--no-capped"]), ["sqlite"], workers=1
    ))  # fmt: skip


def _tampered(ledgers: list[DatasetLedger], change: str) -> list[DatasetLedger]:
    ledgers = copy.deepcopy(ledgers)
    entries = ledgers[0].entries
    if change == "ε above the cap":
        entries[-1]["epsilon_spent_after"] = ledgers[0].dataset["epsilon_cap"] * 1.001
    elif change == "a charge lost":
        entries.remove(next(e for e in entries if e["kind"] == "charge"))
    return ledgers


def test_a_real_server_driven_to_its_cap_passes_and_its_ledger_tampered_fails(
    tmp_path: Path,
) -> None:
    """Eight trainers on two datasets of cap ε=2 (SQLite, 1 worker) until both refuse a release:
    the check passes; then the fetched ledger is tampered with and the check fails."""
    workload: Workload = CAPPED
    with ledger_server(f"sqlite:///{tmp_path / 'ledger.db'}", 1, tmp_path) as server:
        dataset_ids, token = prepare(server, 2, workload)
        load = drive(server, token, dataset_ids, 8, 0.0, 60.0, stop_at_cap=True)
        ledgers = fetch(server, dataset_ids)
    assert load.plans >= 1 and load.charges > 10
    assert load.refused > 0 and load.at_cap == {"load-00", "load-01"}
    assert load.seconds < 60.0  # it stopped at the caps, not at the deadline
    assert load.server_errors == 0 and load.failures == 0
    assert judge(ledgers, load, workload) == []
    for ledger in ledgers:  # reached, not overshot
        assert 0.9 * CAP < ledger.dataset["epsilon_spent"] <= CAP

    (above,) = judge(_tampered(ledgers, "ε above the cap"), load, workload)
    assert "above the cap" in above
    (lost,) = judge(_tampered(ledgers, "a charge lost"), load, workload)
    assert lost == f"{load.charges} charges admitted but {load.charges - 1} charge entries"
