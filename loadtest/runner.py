"""Drives one run: sends requests on the arrival schedule, collects one record per request.

A run is bounded three ways: it sends at most `num_requests`, sends nothing after
`duration_s`, and cancels whatever is still in flight at `global_timeout_s` (those requests are
recorded as `cancelled`). It targets only `endpoint.url`.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

from loadtest.arrival import ArrivalConfig, send_offsets
from loadtest.client import EndpointConfig, send_request
from loadtest.errors import BadFlag
from loadtest.record import RequestRecord
from loadtest.workload import Workload

OnDone = Callable[[RequestRecord], None]


@dataclass(frozen=True)
class RunConfig:
    endpoint: EndpointConfig
    arrival: ArrivalConfig
    num_requests: int | None = 100
    duration_s: float | None = None
    global_timeout_s: float = 3600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise BadFlag("--num-requests", None, "a run needs --num-requests or --duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise BadFlag("--num-requests", self.num_requests, "must be >= 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise BadFlag("--duration", self.duration_s, "must be > 0")
        if not self.global_timeout_s > 0:
            raise BadFlag("--global-timeout", self.global_timeout_s, "must be > 0")


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]
    """Sorted by request index."""
    duration_s: float
    """Run start -> last request finished (or the global timeout)."""
    started_at: str
    """ISO-8601 UTC."""


class _Run:
    """The mutable part of one run: its clock, its HTTP client and the bound on request count."""

    def __init__(self, config: RunConfig, workload: Workload, client: httpx.AsyncClient,
                 on_done: OnDone | None) -> None:
        self.config, self.workload, self.client, self.on_done = config, workload, client, on_done
        limits = [n for n in (config.num_requests, workload.size) if n is not None]
        self.max_requests = min(limits) if limits else math.inf
        self.start = time.perf_counter()
        self.records: list[RequestRecord] = []
        self.tasks: list[asyncio.Task] = []
        self.stopped = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def send_time(self, index: int) -> float | None:
        """Now (perf_counter) if request `index` may be sent now, else None. The caller stamps
        the request with this same reading, so a request decided inside --duration is never
        recorded as sent after it (a thread switch between the check and the send once made
        one start at 0.4 s of a 0.4 s run)."""
        now = time.perf_counter()
        duration = self.config.duration_s
        in_time = duration is None or now - self.start < duration
        return now if not self.stopped and index < self.max_requests and in_time else None

    async def one(self, index: int, sent_at: float) -> None:
        record = await send_request(self.client, self.config.endpoint,
                                    self.workload.spec(index), self.start, sent_at)
        self.records.append(record)
        if self.on_done:
            self.on_done(record)

    async def open_loop(self, trace_times: list[float]) -> None:
        cap = self.config.arrival.concurrency
        slots = asyncio.Semaphore(cap) if cap else None
        offsets = send_offsets(self.config.arrival, self.config.seed, trace_times)
        for index, offset in zip(itertools.count(), offsets):
            duration = self.config.duration_s
            if index >= self.max_requests or (duration is not None and offset >= duration):
                break
            await asyncio.sleep(max(0.0, offset - self.elapsed()))
            if slots:
                await slots.acquire()
            sent_at = self.send_time(index)
            if sent_at is None:  # slept or waited for a slot past the end: send nothing late
                if slots:
                    slots.release()
                break
            self.tasks.append(asyncio.create_task(self._release_after(index, sent_at, slots)))
        await asyncio.gather(*self.tasks)

    async def _release_after(self, index: int, sent_at: float,
                             slots: asyncio.Semaphore | None) -> None:
        try:
            await self.one(index, sent_at)
        finally:
            if slots:
                slots.release()

    async def closed_loop(self) -> None:
        counter = itertools.count()

        async def user() -> None:
            while (sent_at := self.send_time(index := next(counter))) is not None:
                await self.one(index, sent_at)

        users = range(self.config.arrival.concurrency or 1)
        self.tasks = [asyncio.create_task(user()) for _ in users]
        await asyncio.gather(*self.tasks)

    async def stop(self, driver: asyncio.Task) -> None:
        """Global timeout: send nothing more, cancel in-flight requests (each records itself)."""
        self.stopped = True
        driver.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(driver, *self.tasks, return_exceptions=True)


async def run_async(config: RunConfig, workload: Workload, trace_times: list[float] | None = None,
                    on_done: OnDone | None = None) -> RunResult:
    """Run the load; `on_done` is called after every finished request (progress bars)."""
    if config.endpoint.endpoint == "chat" and workload.config.prompt_format == "token_ids":
        raise BadFlag("--prompt-format", "token_ids",
                      "only /v1/completions takes token-id prompts (--endpoint completions)")
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    width = config.arrival.concurrency or 1000
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        run = _Run(config, workload, client, on_done)
        driver = run.closed_loop() if config.arrival.kind == "closed" \
            else run.open_loop(trace_times or [])
        task = asyncio.ensure_future(driver)
        done, _ = await asyncio.wait({task}, timeout=config.global_timeout_s)
        if not done:
            await run.stop(task)
        else:
            task.result()
        duration = run.elapsed()
    records = sorted(run.records, key=lambda r: r.index)
    return RunResult(records, duration, started_at)


def run(config: RunConfig, workload: Workload, trace_times: list[float] | None = None,
        on_done: OnDone | None = None) -> RunResult:
    """Blocking wrapper of run_async (for the CLI and for tests)."""
    return asyncio.run(run_async(config, workload, trace_times, on_done))
