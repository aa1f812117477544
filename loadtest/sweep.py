"""A series of runs at rising load (request rates, or closed-loop concurrencies), and the
highest load that still keeps a target SLO attainment.

A point keeps the target when its SLO attainment reaches it and every percentile SLO
(`tpot_p90=20ms`) holds. "Keeps" is read conservatively: walking up from the lowest load, the
answer is the last point before the first one that misses, so one lucky point past a miss does
not count.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.benchmark import benchmark
from loadtest.errors import BadFlag
from loadtest.metrics import Summary
from loadtest.plots import plot_sweep
from loadtest.report import fmt
from loadtest.runner import RunConfig
from loadtest.slo import SLO
from loadtest.workload import Workload

SWEEP_FORMAT = "kvrelay-loadtest-sweep/1"


@dataclass(frozen=True)
class SweepPoint:
    load: float
    """Request rate (req/s) or concurrency, per `axis`."""
    summary: Summary
    run_json: str


@dataclass(frozen=True)
class SweepResult:
    axis: str
    """"rate" or "concurrency"."""
    target_attainment: float
    points: list[SweepPoint]
    best_load: float | None
    """Highest load keeping the target (None: even the lowest missed it)."""

    def to_dict(self) -> dict[str, Any]:
        return {"format": SWEEP_FORMAT, "axis": self.axis,
                "target_attainment": self.target_attainment, "best_load": _num(self.best_load),
                "points": [{"load": _num(p.load), "run_json": p.run_json,
                            "summary": p.summary.to_dict()} for p in self.points]}


def _num(x: float | None) -> float | str | None:
    return str(x) if x is not None and math.isinf(x) else x


def parse_loads(text: str, flag: str) -> list[float]:
    """`1,2,4,inf` -> ascending loads."""
    try:
        loads = sorted(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BadFlag(flag, text, "expected comma-separated numbers, e.g. 1,2,4,8") from None
    if not loads or loads[0] <= 0:
        raise BadFlag(flag, text, "needs one or more positive values")
    return loads


def best_load(points: list[SweepPoint], target: float) -> float | None:
    best = None
    for point in points:
        if point.summary.attainment < target or not point.summary.slos_held:
            break
        best = point.load
    return best


def _point_config(base: RunConfig, axis: str, load: float) -> RunConfig:
    if axis == "rate":
        return dataclasses.replace(base, arrival=dataclasses.replace(base.arrival, rate=load))
    arrival = dataclasses.replace(base.arrival, kind="closed", concurrency=int(load))
    return dataclasses.replace(base, arrival=arrival)


def run_sweep(base: RunConfig, workload: Workload, axis: str, loads: list[float],
              slos: tuple[SLO, ...], target: float, out_dir: Path,
              progress: bool = True, source: str | None = None,
              label: str | None = None) -> SweepResult:
    """One benchmark per load into out_dir/<axis>_<load>/, then sweep.json, sweep.md, plots."""
    points = []
    for load in loads:
        config = _point_config(base, axis, load)
        point_dir = out_dir / f"{axis}_{load:g}"
        doc, outputs = benchmark(config, workload, slos, point_dir, progress=progress,
                                 progress_label=f"{axis} {load:g}", source=source, label=label)
        points.append(SweepPoint(load, doc.summary, str(outputs.json)))
    result = SweepResult(axis, target, points, best_load(points, target))
    (out_dir / "sweep.json").write_text(json.dumps(result.to_dict(), indent=1))
    (out_dir / "sweep.md").write_text(markdown_sweep(result))
    finite = [p for p in points if math.isfinite(p.load)]
    xlabel = "rate (req/s)" if axis == "rate" else "concurrency"
    plot_sweep([p.load for p in finite], [p.summary for p in finite], xlabel, out_dir)
    return result


def markdown_sweep(result: SweepResult) -> str:
    s = [p.summary for p in result.points]
    lines = [
        f"## sweep over {result.axis} (target SLO attainment {result.target_attainment:.0%}; "
        f"SLOs: {', '.join(s[0].slos) if s and s[0].slos else 'none'})",
        "",
        f"| {result.axis} | ok/sent | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 "
        "| TPOT p99 | goodput | attainment |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result.points:
        m = p.summary
        lines.append(
            f"| {p.load:g} | {m.num_ok}/{m.num_requests} | {fmt(m.request_throughput)} "
            f"| {fmt(m.output_token_throughput, digits=1)} | {fmt(m.ttft.p50, 1e3)} "
            f"| {fmt(m.ttft.p99, 1e3)} | {fmt(m.tpot.p50, 1e3)} | {fmt(m.tpot.p99, 1e3)} "
            f"| {fmt(m.goodput)} | {fmt(m.attainment, 100, 1)}% |")
    best = "none" if result.best_load is None else f"{result.best_load:g}"
    lines += ["", f"highest {result.axis} keeping the target: **{best}** (latencies in ms)"]
    return "\n".join(lines) + "\n"
