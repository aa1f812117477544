"""Arrival processes: when each request is sent, as offsets in seconds from the run's start.

Open loop (the server cannot slow the sender down): `poisson` (exponential gaps at `rate`),
`constant` (gaps of exactly 1/rate), `gamma` (gamma gaps with mean 1/rate and shape
`burstiness`: 1 is Poisson, < 1 burstier, > 1 smoother; as vLLM's --burstiness), and `trace`
(the trace file's timestamps). A rate of inf sends everything at once.
Closed loop: `closed` keeps `concurrency` requests in flight, each sending its next request
when the last one ends, so it has no schedule here (the runner drives it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from loadtest.errors import BadFlag

ArrivalKind = Literal["poisson", "constant", "gamma", "closed", "trace"]
ARRIVAL_KINDS: tuple[str, ...] = ("poisson", "constant", "gamma", "closed", "trace")


@dataclass(frozen=True)
class ArrivalConfig:
    kind: ArrivalKind = "poisson"
    rate: float = math.inf
    """Requests per second of the open-loop processes."""
    burstiness: float = 1.0
    concurrency: int | None = None
    """closed: requests kept in flight; open loop: a cap on in-flight requests (None: none)."""
    trace_speedup: float = 1.0
    """trace: timestamps are divided by this (2.0 replays twice as fast)."""

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise BadFlag("--arrival", self.kind, f"must be one of {', '.join(ARRIVAL_KINDS)}")
        if not self.rate > 0:
            raise BadFlag("--rate", self.rate, "must be > 0 (inf sends all at once)")
        if not self.burstiness > 0:
            raise BadFlag("--burstiness", self.burstiness, "must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise BadFlag("--concurrency", self.concurrency, "must be >= 1")
        if self.kind == "closed" and self.concurrency is None:
            raise BadFlag("--arrival", self.kind, "closed loop needs --concurrency")
        if not self.trace_speedup > 0:
            raise BadFlag("--trace-speedup", self.trace_speedup, "must be > 0")

    @property
    def open_loop(self) -> bool:
        return self.kind != "closed"


def interarrival_gaps(config: ArrivalConfig, seed: int) -> Iterator[float]:
    """Endless seeded gaps between consecutive sends of an open-loop process (not `trace`)."""
    if math.isinf(config.rate):
        return itertools.repeat(0.0)
    mean_gap = 1.0 / config.rate
    if config.kind == "constant":
        return itertools.repeat(mean_gap)
    rng = np.random.default_rng(seed)
    if config.kind == "poisson":
        return (float(rng.exponential(mean_gap)) for _ in itertools.count())
    if config.kind == "gamma":
        shape = config.burstiness
        return (float(rng.gamma(shape, mean_gap / shape)) for _ in itertools.count())
    raise BadFlag("--arrival", config.kind, "has no inter-arrival gaps")


def send_offsets(
    config: ArrivalConfig, seed: int, trace_timestamps: Sequence[float] = ()
) -> Iterator[float]:
    """Send time of request 0, 1, 2, ... in seconds from start; the first request goes at 0."""
    if config.kind == "trace":
        start = trace_timestamps[0] if trace_timestamps else 0.0
        return ((t - start) / config.trace_speedup for t in trace_timestamps)
    gaps = interarrival_gaps(config, seed)
    return itertools.accumulate(itertools.chain([0.0], gaps))
