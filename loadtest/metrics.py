"""Summary statistics of a run: latency percentiles, throughput, goodput and SLO attainment.

Latency distributions use successful requests only; attainment counts every request sent
(a failed request misses every SLO), so errors lower attainment instead of hiding from it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.record import RequestRecord
from loadtest.slo import SLO, holds, meets_slos

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles (numpy's linear interpolation) of one metric, in its own unit."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if len(values) == 0:
            return cls()
        arr = np.asarray(values, dtype=np.float64)
        p50, p90, p95, p99 = (float(v) for v in np.percentile(arr, PERCENTILES))
        return cls(len(arr), float(arr.mean()), p50, p90, p95, p99, float(arr.max()))


@dataclass(frozen=True)
class Summary:
    num_requests: int
    num_ok: int
    num_failed: int
    errors: dict[str, int]
    duration_s: float
    """Run start -> last request finished."""
    request_throughput: float
    """Successful requests per second."""
    input_token_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    prompt_tokens: Distribution
    output_tokens: Distribution
    cached_tokens: int | None = None
    """Prompt tokens served from the server's prefix cache, summed over successful requests
    (None: the server reports none)."""
    cached_ratio: float | None = None
    """cached_tokens / prompt tokens of the requests that report it."""
    slos: list[str] = field(default_factory=list)
    num_good: int = 0
    """Successful requests meeting every SLO (all successful ones when no SLO is given)."""
    goodput: float = 0.0
    """num_good per second of duration_s."""
    attainment: float = 0.0
    """num_good / num_requests, in [0, 1]."""
    slos_held: bool = True
    """Every percentile SLO (`tpot_p90<=20ms`) holds over the run (loadtest/slo.py)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        dists = {"ttft", "tpot", "itl", "e2e", "prompt_tokens", "output_tokens"}
        return cls(**{k: Distribution(**v) if k in dists else v for k, v in data.items()})


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slos: tuple[SLO, ...] = ()
) -> Summary:
    """Fold per-request records into one Summary. `duration_s` must be > 0 for rates."""
    ok = [r for r in records if r.ok]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    tokens_in = sum(r.prompt_tokens for r in ok)
    tokens_out = sum(r.output_tokens for r in ok)
    num_good = sum(meets_slos(r, slos) for r in records)
    reporting = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens for r in reporting) if reporting else None
    return Summary(
        num_requests=len(records),
        num_ok=len(ok),
        num_failed=len(records) - len(ok),
        errors=dict(Counter(r.error for r in records if r.error is not None)),
        duration_s=duration_s,
        request_throughput=len(ok) * per_s,
        input_token_throughput=tokens_in * per_s,
        output_token_throughput=tokens_out * per_s,
        total_token_throughput=(tokens_in + tokens_out) * per_s,
        ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=Distribution.of([r.tpot for r in ok if r.tpot is not None]),
        itl=Distribution.of([gap for r in ok for gap in r.itl]),
        e2e=Distribution.of([r.e2e for r in ok if r.e2e is not None]),
        prompt_tokens=Distribution.of([r.prompt_tokens for r in ok]),
        output_tokens=Distribution.of([r.output_tokens for r in ok]),
        cached_tokens=cached,
        cached_ratio=(cached / max(1, sum(r.prompt_tokens for r in reporting))
                      if reporting else None),
        slos=[str(s) for s in slos],
        num_good=num_good,
        goodput=num_good * per_s,
        attainment=num_good / len(records) if records else 0.0,
        slos_held=all(holds(records, slo) for slo in slos),
    )
