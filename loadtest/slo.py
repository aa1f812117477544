"""Service-level objectives (`--slo ttft=500ms`) and the check of one record against them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from loadtest.errors import BadFlag
from loadtest.record import RequestRecord

SLO_METRICS = ("ttft", "tpot", "e2e")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_PATTERN = re.compile(r"^\s*(\w+)\s*[=:<]\s*([0-9.]+(?:e-?[0-9]+)?)\s*(us|ms|s)?\s*$")


@dataclass(frozen=True)
class SLO:
    metric: str
    """One of SLO_METRICS."""
    limit_s: float
    """A request meets the SLO when its metric is <= this many seconds."""

    def __str__(self) -> str:
        return f"{self.metric}<={self.limit_s * 1e3:g}ms"


def parse_slo(text: str) -> SLO:
    """`ttft=500ms`, `tpot=50ms`, `e2e=2s` (no unit: milliseconds, as vLLM's --goodput)."""
    match = _PATTERN.match(text)
    if not match:
        raise BadFlag("--slo", text, "expected METRIC=VALUE[us|ms|s], e.g. ttft=500ms")
    metric, value, unit = match.group(1).lower(), float(match.group(2)), match.group(3) or "ms"
    if metric not in SLO_METRICS:
        raise BadFlag("--slo", text, f"metric must be one of {', '.join(SLO_METRICS)}")
    if value <= 0:
        raise BadFlag("--slo", text, "limit must be positive")
    return SLO(metric, value * _UNITS[unit])


def meets_slos(record: RequestRecord, slos: tuple[SLO, ...]) -> bool:
    """True when the request succeeded and every SLO holds.

    A one-token output has no TPOT; it meets any TPOT SLO (it had no decode phase to be slow in).
    """
    if not record.ok:
        return False
    for slo in slos:
        value = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}[slo.metric]
        if value is None and slo.metric == "tpot":
            continue
        if value is None or value > slo.limit_s:
            return False
    return True
