"""Service-level objectives (`--slo ttft=500ms`, `--slo tpot_p90=20ms`) and their checks.

A plain SLO is per request: a request meets it when its metric is within the limit, and
goodput counts the requests meeting every SLO. An SLO with a percentile (`tpot_p90=20ms`:
"p90 TPOT within 20 ms") is also a property of the whole run: the run holds it when at least
90% of the requests sent meet the limit, i.e. the p90 of the metric is within it with failed
requests counted as misses (DistServe's SLO attainment).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest.errors import BadFlag
from loadtest.record import RequestRecord

SLO_METRICS = ("ttft", "tpot", "e2e")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_PATTERN = re.compile(r"^\s*(\w+?)(?:_p([0-9]+(?:\.[0-9]+)?))?\s*(?:<=|[=:<])\s*"
                      r"([0-9.]+(?:e-?[0-9]+)?)\s*(us|ms|s)?\s*$")


@dataclass(frozen=True)
class SLO:
    metric: str
    """One of SLO_METRICS."""
    limit_s: float
    """A request meets the SLO when its metric is <= this many seconds."""
    percentile: float | None = None
    """None: per request only. p in (0, 100]: a run holds it when >= p% of requests meet it."""

    def __str__(self) -> str:
        name = self.metric if self.percentile is None else f"{self.metric}_p{self.percentile:g}"
        return f"{name}<={self.limit_s * 1e3:g}ms"


def parse_slo(text: str) -> SLO:
    """`ttft=500ms`, `tpot=50ms`, `e2e=2s`, `tpot_p90=20ms` (no unit: milliseconds, as vLLM's
    --goodput; `:` and `<=` work as `=`)."""
    match = _PATTERN.match(text)
    if not match:
        raise BadFlag("--slo", text, "expected METRIC[_pNN]=VALUE[us|ms|s], e.g. ttft=500ms "
                                     "or tpot_p90=20ms")
    metric, unit = match.group(1).lower(), match.group(4) or "ms"
    try:
        value = float(match.group(3))
    except ValueError:
        raise BadFlag("--slo", text, "the limit is not a number") from None
    percentile = float(match.group(2)) if match.group(2) else None
    if metric not in SLO_METRICS:
        raise BadFlag("--slo", text, f"metric must be one of {', '.join(SLO_METRICS)}")
    if value <= 0:
        raise BadFlag("--slo", text, "limit must be positive")
    if percentile is not None and not 0 < percentile <= 100:
        raise BadFlag("--slo", text, "the percentile must be in (0, 100]")
    return SLO(metric, value * _UNITS[unit], percentile)


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """True when the request succeeded and its metric is within the limit.

    A one-token output has no TPOT; it meets any TPOT SLO (it had no decode phase to be slow in).
    """
    if not record.ok:
        return False
    value = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}[slo.metric]
    if value is None:
        return slo.metric == "tpot"
    return value <= slo.limit_s


def meets_slos(record: RequestRecord, slos: tuple[SLO, ...]) -> bool:
    """True when the request succeeded and every SLO holds for it."""
    return record.ok and all(meets_slo(record, slo) for slo in slos)


def holds(records: Sequence[RequestRecord], slo: SLO) -> bool:
    """A run holds a percentile SLO when at least that share of its requests (sent, so failures
    count as misses) meet the limit; a plain SLO is per request and always holds here."""
    if slo.percentile is None:
        return True
    met = sum(meets_slo(r, slo) for r in records)
    return bool(records) and met >= slo.percentile / 100 * len(records) - 1e-9
