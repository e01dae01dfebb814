"""The load's client: one keep-alive HTTP/1.1 connection per simulated trainer, and its tally.

A few lines of asyncio (uvloop) rather than httpx: on a 2-core box httpx's AsyncClient costs
about 1.4 ms of CPU per request, enough to starve the server; this client costs about 40 µs.
Linux only (/proc for the CPU figures).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
import uuid
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

REQUEST_TIMEOUT_S = 60.0
ATTEMPTS = 3  # a request whose connection breaks is sent again, with the same key
NO_ANSWER = 0  # the status recorded when every attempt failed
REFUSAL_CODE = "budget_exhausted"  # the problem+json code of the cap filter's refusal

_CLOCK_TICK = os.sysconf("SC_CLK_TCK")
ADMISSIONS = ("plan", "epoch", "release")


class Connection:
    """One keep-alive HTTP/1.1 connection to the server, as one trainer process holds."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self._head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """POST with a fresh Idempotency-Key: (status, body), or (NO_ANSWER, b"") on failure.

        A broken or timed-out connection is reopened and the same request, with the same key,
        sent again (the server then replays its first answer instead of charging twice).
        """
        content_type = "Content-Type: application/json\r\n" if body else ""
        request = (
            f"POST {path} HTTP/1.1\r\n{self._head}Idempotency-Key: {uuid.uuid4()}\r\n"
            f"{content_type}Content-Length: {len(body)}\r\n\r\n"
        ).encode("ascii") + body
        for _ in range(ATTEMPTS):
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    return await self._exchange(request)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                self.close()
        return NO_ANSWER, b""

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET once (no retries: the load drives POSTs; bench/cost.py times reads too)."""
        return await self._exchange(f"GET {path} HTTP/1.1\r\n{self._head}\r\n".encode("ascii"))

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(request)
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        length, keep_alive = 0, True
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                keep_alive = value.strip().lower() != "close"
            elif name == "transfer-encoding":
                raise ValueError("a chunked answer: no endpoint driven here streams")
        body = await self._reader.readexactly(length)
        if not keep_alive:
            self.close()
        return status, body

    def close(self) -> None:
        """Drop the socket (the next request opens a new one)."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass(frozen=True)
class Clock:
    """A run's phases on the perf_counter clock: warm-up, then the measured window."""

    window_start: float
    window_end: float

    @classmethod
    def starting_now(cls, warmup: float, duration: float) -> Clock:
        """Warm-up from now, then the window."""
        start = time.perf_counter() + warmup
        return cls(start, start + duration)

    def running(self) -> bool:
        """Whether new requests may still start."""
        return time.perf_counter() < self.window_end

    def inside(self, moment: float) -> bool:
        """Whether a request that ended at `moment` counts toward the window's figures."""
        return self.window_start <= moment <= self.window_end


@dataclass(frozen=True)
class Cpu:
    """CPU used over the window, in cores: the client, the server's process group, the machine."""

    client: float
    server: float
    machine: float


@dataclass(frozen=True)
class Load:
    """What one load run measured."""

    seconds: float
    admitted: int  # in the window
    latencies: list[float]  # seconds, of admission requests that ended in the window
    refused: int  # 409 budget_exhausted, whole run
    server_errors: int  # 5xx, whole run
    failures: int  # other 4xx (other 409s too) and unanswered requests, whole run
    plans: int  # admitted plans, whole run (= hold entries)
    charges: int  # admitted epochs and releases, whole run (= charge entries)
    completions: int  # completed runs, whole run (= release_hold entries)
    cpu: Cpu
    at_cap: frozenset[str] = frozenset()  # datasets that refused a release: their cap is reached

    @property
    def rate(self) -> float:
        """Admissions per second over the window (NaN when the run stopped before it began)."""
        return self.admitted / self.seconds if self.seconds > 0 else math.nan

    def percentile_ms(self, percent: int) -> float:
        """A latency percentile in milliseconds (NaN when too few requests ended in the window)."""
        if len(self.latencies) < 2:
            return math.nan
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[percent - 1] * 1e3


def refusal_code(body: bytes) -> str | None:
    """The problem+json `code` of an answer, None when it has none."""
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) else None


@dataclass
class Tally:
    """Counts and latencies of one run, shared by its simulated trainers (one event loop)."""

    clock: Clock
    latencies: list[float] = field(default_factory=list)
    admitted_in_window: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    at_cap: set[str] = field(default_factory=set)
    stop_at_cap: int = 0  # stop once this many datasets are at their cap (0: run the window)
    stopped_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def running(self) -> bool:
        """Whether new requests may still start: inside the clock, and some cap not reached."""
        if self.stopped_at is None:
            now = time.perf_counter()
            if now >= self.clock.window_end or 0 < self.stop_at_cap <= len(self.at_cap):
                self.stopped_at = min(now, self.clock.window_end)
                self.done.set()
        return self.stopped_at is None

    def record(
        self,
        kind: str,
        status: int,
        started: float,
        ended: float,
        *,
        body: bytes = b"",
        dataset_id: str | None = None,
    ) -> None:
        """Count one answered (or unanswered) request of `kind` (on `dataset_id`, if known)."""
        inside = self.clock.inside(ended)
        if kind in ADMISSIONS:
            if inside:
                self.latencies.append(ended - started)
            if status == 201:
                self.outcomes["plan" if kind == "plan" else "charge"] += 1
                if inside:
                    self.admitted_in_window += 1
        elif 200 <= status < 300:
            self.outcomes["completion"] += 1
        if status == 409 and refusal_code(body) == REFUSAL_CODE:
            self.outcomes["refused"] += 1
            # A release is the mix's smallest charge: once one is refused, the cap is reached.
            if kind == "release" and dataset_id is not None:
                self.at_cap.add(dataset_id)
        elif status >= 500:
            self.outcomes["server_error"] += 1
        elif status == NO_ANSWER or status >= 400:
            self.outcomes["failure"] += 1

    def load(self, cpu: Cpu) -> Load:
        """The run's figures."""
        end = self.clock.window_end
        return Load(
            seconds=max(0.0, (self.stopped_at or end) - self.clock.window_start),
            admitted=self.admitted_in_window,
            latencies=self.latencies,
            refused=self.outcomes["refused"],
            server_errors=self.outcomes["server_error"],
            failures=self.outcomes["failure"],
            plans=self.outcomes["plan"],
            charges=self.outcomes["charge"],
            completions=self.outcomes["completion"],
            cpu=cpu,
            at_cap=frozenset(self.at_cap),
        )


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / _CLOCK_TICK


def cpu_counters(pgid: int) -> tuple[float, float, float, float]:
    """(wall, client, server, machine) seconds now."""
    return time.perf_counter(), time.process_time(), group_cpu_seconds(pgid), machine_busy_seconds()


async def sample_cpu(clock: Clock, pgid: int, done: asyncio.Event) -> Cpu:
    """The CPU used over the window, sampled at its start and at its end (or when `done`)."""
    with suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), clock.window_start - time.perf_counter())
    if done.is_set():  # the run stopped before its window began
        return Cpu(math.nan, math.nan, math.nan)
    before = cpu_counters(pgid)
    with suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), clock.window_end - time.perf_counter())
    after = cpu_counters(pgid)
    wall = after[0] - before[0]
    client, server, machine = ((b - a) / wall for a, b in zip(before[1:], after[1:], strict=True))
    return Cpu(client, server, machine)
