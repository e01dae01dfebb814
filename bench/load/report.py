"""The report: progress lines on stderr, the tables and the issue's goals on stdout."""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, text

from bench.load.client import Load
from bench.load.workloads import Workload

if TYPE_CHECKING:
    from bench.load.growth import GrowthPoint

GOAL_ADMISSIONS_PER_S = 1000.0  # PostgreSQL, 2 workers, GOAL_CLIENTS, on 1 and on 16 datasets
GOAL_FRAMEWORK_SHARE = 0.12  # … and at least this share of the null endpoint's rate
GOAL_P99_TO_FRAMEWORK = 2.0  # p99 at most this multiple of the null endpoint's p99
GOAL_SQLITE_ADMISSIONS_PER_S = 600.0  # SQLite, 1 worker, GOAL_CLIENTS
GOAL_CLIENTS = 64
GOAL_GROWTH_RATIO = 1.10


@dataclass(frozen=True)
class Config:
    """One load configuration."""

    backend: str
    workers: int
    datasets: int
    clients: int
    workload: Workload


@dataclass(frozen=True)
class Measured:
    """One configuration's load and its overspend check's problems."""

    config: Config
    load: Load
    problems: list[str]


def progress(line: str) -> None:
    """A timestamped progress line on stderr (the tables go to stdout)."""
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """Rows as a Markdown table, or as aligned plain text."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in [headers, *rows]
    )


def number(value: float | None, digits: int = 0) -> str:
    """A figure for a table cell ("-" when not measured)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(value: float, ceiling: float | None) -> str:
    """`value` as a fraction of its ceiling."""
    return "-" if not ceiling else f"{value / ceiling:.2f}"


def machine_lines(backends: Sequence[str], admin_url: str) -> list[str]:
    """The machine, the software, the load average now and the command."""
    cpu_model = "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    lines = [
        f"machine: {os.cpu_count()} cores ({cpu_model}), {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
    ]
    if "postgres" in backends:
        engine = create_engine(admin_url)
        with engine.connect() as connection:
            lines.append(str(connection.execute(text("SELECT version()")).scalar_one()))
        engine.dispose()
    load1, load5, _ = os.getloadavg()
    lines.append(f"load average at start: {load1:.2f} (1 min), {load5:.2f} (5 min)")
    lines.append("command: .venv/bin/python -m bench.load " + " ".join(sys.argv[1:]))
    return lines


def load_table(
    measured: Sequence[Measured],
    framework: dict[tuple[int, int], Load],
    pgbench: dict[int, float],
    markdown: bool,
) -> str:
    """The load figures, one row per configuration."""
    headers = [
        "backend", "workers", "datasets", "clients", "cap ε", "adm/s", "÷ framework",
        "÷ pgbench", "p50 ms", "p95 ms", "p99 ms", "refused", "at cap", "5xx", "failed",
        "client CPU", "server CPU", "machine CPU", "overspend check",
    ]  # fmt: skip
    rows = []
    for m in measured:
        c, load = m.config, m.load
        ceiling = framework.get((c.workers, c.clients))
        rows.append(
            [
                c.backend, str(c.workers), str(c.datasets), str(c.clients),
                f"{c.workload.epsilon_cap:g}", number(load.rate),
                ratio(load.rate, ceiling.rate if ceiling else None),
                ratio(load.rate, pgbench.get(c.clients) if c.backend == "postgres" else None),
                number(load.percentile_ms(50), 1), number(load.percentile_ms(95), 1),
                number(load.percentile_ms(99), 1), str(load.refused),
                f"{len(load.at_cap)}/{c.datasets}", str(load.server_errors), str(load.failures),
                number(load.cpu.client, 2), number(load.cpu.server, 2),
                number(load.cpu.machine, 2), "; ".join(m.problems) or "ok",
            ]
        )  # fmt: skip
    return table(headers, rows, markdown)


def ceiling_table(
    framework: dict[tuple[int, int], Load], pgbench: dict[int, float], markdown: bool
) -> str:
    """The ceilings: the null FastAPI app per workers × clients, pgbench per clients."""
    headers = ["workers", "clients", "framework adm/s", "framework p50 ms", "framework p99 ms"]
    headers += ["client CPU", "machine CPU", "pgbench tps (1 row)"]
    rows = [
        [
            str(workers), str(clients), number(load.rate), number(load.percentile_ms(50), 1),
            number(load.percentile_ms(99), 1), number(load.cpu.client, 2),
            number(load.cpu.machine, 2), number(pgbench.get(clients)),
        ]
        for (workers, clients), load in sorted(framework.items())
    ]  # fmt: skip
    return table(headers, rows, markdown)


def growth_table(points: Sequence[GrowthPoint], markdown: bool) -> str:
    """Epoch admission latency and server CPU against history, with ratios to the smallest."""
    headers = ["backend", "entries before", "p50 ms", "p99 ms", "server CPU ms"]
    headers += ["p50 ÷ smallest", "p99 ÷ smallest", "CPU ÷ smallest"]
    rows = []
    for point in points:
        first = next(p for p in points if p.backend == point.backend)
        rows.append(
            [
                point.backend, f"{point.entries:,}",
                number(point.percentile_ms(50), 2), number(point.percentile_ms(99), 2),
                number(point.server_cpu_ms, 2),
                f"{point.percentile_ms(50) / first.percentile_ms(50):.2f}",
                f"{point.percentile_ms(99) / first.percentile_ms(99):.2f}",
                f"{point.server_cpu_ms / first.server_cpu_ms:.2f}",
            ]
        )  # fmt: skip
    return table(headers, rows, markdown)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _throughput_goals(
    measured: Sequence[Measured], framework: dict[tuple[int, int], Load]
) -> list[str]:
    lines = []
    headroom = [m for m in measured if not m.config.workload.reaches_cap]
    pg = [
        m for m in headroom
        if (m.config.backend, m.config.workers, m.config.clients) == ("postgres", 2, GOAL_CLIENTS)
    ]  # fmt: skip
    goal = f"≥{GOAL_ADMISSIONS_PER_S:,.0f} adm/s and ≥{GOAL_FRAMEWORK_SHARE:.0%} of the framework"
    where = f"PostgreSQL, 2 workers, {GOAL_CLIENTS} clients"
    if not pg:
        lines.append(f"{goal}, {where}: not measured")
    for m in pg:
        null = framework.get((2, GOAL_CLIENTS))
        share = m.load.rate / null.rate if null else math.nan
        ok = m.load.rate >= GOAL_ADMISSIONS_PER_S and share >= GOAL_FRAMEWORK_SHARE
        lines.append(
            f"{goal}, {where}, {m.config.datasets} datasets: {_verdict(ok)} — "
            f"{m.load.rate:,.0f}/s, {share:.0%} of the framework"
        )
        null_p99 = null.percentile_ms(99) if null else math.nan
        p99 = m.load.percentile_ms(99)
        lines.append(
            f"p99 ≤ {GOAL_P99_TO_FRAMEWORK:g} × the framework's, {where}, {m.config.datasets} "
            f"datasets: {_verdict(p99 <= GOAL_P99_TO_FRAMEWORK * null_p99)} — "
            f"{p99:,.1f} ms against {null_p99:,.1f} ms"
        )
    lite = [
        m for m in headroom
        if (m.config.backend, m.config.workers, m.config.clients) == ("sqlite", 1, GOAL_CLIENTS)
    ]  # fmt: skip
    if not lite:
        lines.append(f"≥{GOAL_SQLITE_ADMISSIONS_PER_S:,.0f} adm/s, SQLite, 1 worker: not measured")
    for m in lite:
        lines.append(
            f"≥{GOAL_SQLITE_ADMISSIONS_PER_S:,.0f} adm/s, SQLite, 1 worker, {GOAL_CLIENTS} "
            f"clients, {m.config.datasets} datasets: "
            f"{_verdict(m.load.rate >= GOAL_SQLITE_ADMISSIONS_PER_S)} — {m.load.rate:,.0f}/s"
        )
    return lines


def _check_goals(measured: Sequence[Measured]) -> list[str]:
    if not measured:
        return ["overspend check ok and 0 5xx: not measured"]
    failed = [m for m in measured if m.problems]
    capped = [m for m in measured if m.config.workload.reaches_cap]
    refused = sum(m.load.refused for m in capped)
    lines = [
        f"overspend check ok and 0 5xx in every configuration: {_verdict(not failed)} — "
        f"{len(measured) - len(failed)} of {len(measured)}"
    ]
    if capped:
        reached = sum(len(m.load.at_cap) for m in capped)
        total = sum(m.config.datasets for m in capped)
        lines.append(
            f"the cap holds where datasets reach it: "
            f"{_verdict(not any(m.problems for m in capped))} — {len(capped)} configurations, "
            f"{refused:,} refusals, {reached} of {total} datasets at their cap"
        )
    else:
        lines.append("the cap holds where datasets reach it: not measured (--no-capped)")
    return lines


def _growth_goals(points: Sequence[GrowthPoint]) -> list[str]:
    lines = []
    for backend in dict.fromkeys(p.backend for p in points):
        mine = [p for p in points if p.backend == backend]
        growth = mine[-1].percentile_ms(50) / mine[0].percentile_ms(50)
        lines.append(
            f"epoch p50 at {mine[-1].entries:,} entries within {GOAL_GROWTH_RATIO - 1:.0%} of "
            f"{mine[0].entries:,} ({backend}): {_verdict(growth <= GOAL_GROWTH_RATIO)} — "
            f"ratio {growth:.2f} (p99 ratio "
            f"{mine[-1].percentile_ms(99) / mine[0].percentile_ms(99):.2f}, server CPU ratio "
            f"{mine[-1].server_cpu_ms / mine[0].server_cpu_ms:.2f})"
        )
    return lines or ["latency growth with history: not measured"]


def goals(
    measured: Sequence[Measured],
    framework: dict[tuple[int, int], Load],
    points: Sequence[GrowthPoint],
) -> list[str]:
    """The issue's goals, each met / MISSED / not measured, with the figure that decides it."""
    lines = _throughput_goals(measured, framework) + _check_goals(measured)
    return lines + _growth_goals(points)
