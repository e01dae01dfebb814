"""Prometheus metrics, correct with several worker processes.

`privacy-ledger serve` points PROMETHEUS_MULTIPROC_DIR at a fresh folder
before the workers start, so every worker's counters land in shared files
and any worker's /metrics answers for all of them. Per-dataset ε gauges are
read from the database at scrape time (by the domain, which hands them to
`render`), so they are the same whichever worker answers.

This module lies below the domain: the domain counts through it, and it
imports nothing of ours (the `metrics-below-domain` import contract), so the
two can never import each other in a cycle.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "DatasetGauge", "render"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "ledger_http_requests_total", "HTTP requests answered.", ["method", "route", "status"]
)
LATENCY = Histogram(
    "ledger_http_request_duration_seconds",
    "HTTP request latency.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
ADMISSIONS = Counter(
    "ledger_admissions_total",
    "Admission decisions by operation (plan, epoch, release) and outcome.",
    ["operation", "outcome"],
)
REFUSALS = Counter(
    "ledger_budget_refusals_total", "Requests refused by the cap filter.", ["operation"]
)
LANE = Counter(
    "ledger_admission_lane_total",
    "Requests of the admission lane's routes it served itself, or passed to the framework.",
    ["outcome"],
)
REPLAYS = Counter("ledger_idempotent_replays_total", "Responses replayed for an Idempotency-Key.")
LOCK_WAIT = Histogram(
    "ledger_lock_wait_seconds",
    "Time a write transaction waited for its database lock.",
    buckets=_LATENCY_BUCKETS,
)

BATCH_SIZE = Histogram(
    "ledger_batch_size",
    "Admissions of one dataset decided and committed together in one write transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_WAIT = Histogram(
    "ledger_batch_wait_seconds",
    "Time an admission queued in its process before its batch began.",
    buckets=_LATENCY_BUCKETS,
)


@dataclass(frozen=True)
class DatasetGauge:
    """One dataset's ε figures as a scrape shows them (computed by the domain)."""

    dataset: str
    epsilon_spent: float
    epsilon_reserved: float
    epsilon_cap: float


class DatasetCollector(Collector):
    """ε spent / reserved / cap per dataset, from figures read when scraped."""

    def __init__(self, gauges: Iterable[DatasetGauge]) -> None:
        self.gauges = list(gauges)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        spent = GaugeMetricFamily(
            "ledger_dataset_epsilon_spent", "Filter ε of posted charges.", labels=["dataset"]
        )
        reserved = GaugeMetricFamily(
            "ledger_dataset_epsilon_reserved", "Filter ε of charges plus holds.", labels=["dataset"]
        )
        cap = GaugeMetricFamily(
            "ledger_dataset_epsilon_cap", "The dataset's cap.", labels=["dataset"]
        )
        for gauge in self.gauges:
            spent.add_metric([gauge.dataset], gauge.epsilon_spent)
            reserved.add_metric([gauge.dataset], gauge.epsilon_reserved)
            cap.add_metric([gauge.dataset], gauge.epsilon_cap)
        yield from (spent, reserved, cap)


def render(datasets: Iterable[DatasetGauge]) -> bytes:
    """The exposition text: every worker's counters plus the dataset gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        process_metrics = generate_latest(registry)
    else:
        process_metrics = generate_latest(REGISTRY)
    gauges = CollectorRegistry()
    gauges.register(DatasetCollector(datasets))
    return process_metrics + generate_latest(gauges)


def admission(operation: str, outcome: str) -> None:
    """Count one admission decision (and a refusal when the filter said no)."""
    ADMISSIONS.labels(operation, outcome).inc()
    if outcome == "budget_exhausted":
        REFUSALS.labels(operation).inc()
