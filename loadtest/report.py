"""Run results on disk (one JSON document per run) and as markdown tables.

The JSON document: {"format": "kvrelay-loadtest-run/1", "meta": {...how the run was made},
"summary": Summary.to_dict(), "records": [RequestRecord.to_dict(), ...]}. `compare` and
`sweep` read it back with `load_run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.errors import BadResultFile
from loadtest.metrics import Distribution, Summary
from loadtest.record import RequestRecord

RUN_FORMAT = "kvrelay-loadtest-run/1"
LATENCY_ROWS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))


@dataclass(frozen=True)
class RunDocument:
    meta: dict[str, Any]
    summary: Summary
    records: list[RequestRecord]

    def to_dict(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, "meta": self.meta, "summary": self.summary.to_dict(),
                "records": [r.to_dict() for r in self.records]}


def write_run(doc: RunDocument, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc.to_dict(), indent=1))
    return path


def load_run(path: str | Path) -> RunDocument:
    """Read a run JSON written by write_run; raises BadResultFile on anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadResultFile(str(path), str(exc)) from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise BadResultFile(str(path), f"not a {RUN_FORMAT} document")
    records = [RequestRecord.from_dict(r) for r in data["records"]]
    return RunDocument(data["meta"], Summary.from_dict(data["summary"]), records)


def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _latency_row(name: str, dist: Distribution) -> str:
    cells = [fmt(getattr(dist, k), 1e3) for k in ("mean", "p50", "p90", "p95", "p99", "max")]
    return f"| {name} (ms) | " + " | ".join(cells) + f" | {dist.count} |"


def _describe(meta: dict[str, Any]) -> str:
    arrival, workload = meta.get("arrival", {}), meta.get("workload", {})
    load = f"{arrival.get('kind')} rate={arrival.get('rate')}"
    if arrival.get("kind") == "gamma":
        load += f" burstiness={arrival.get('burstiness')}"
    if arrival.get("concurrency"):
        load += f" concurrency={arrival.get('concurrency')}"
    kind, out = workload.get("kind"), workload.get("output_len")
    work = f"{kind} in={workload.get('input_len')} out={out}"
    if kind in ("file", "trace"):
        work = f"{kind} {workload.get('source')} (out={out} where the file has none)"
    if workload.get("shared_prefix_len"):
        work += f" prefix={workload['shared_prefix_len']}"
    if workload.get("prompt_format") == "token_ids" and kind != "file":
        work += f" token ids < {workload.get('vocab_size')}"
    return f"load: {load}; workload: {work}"


def markdown_run(meta: dict[str, Any], summary: Summary) -> str:
    """The run's one table set: what was run, latency percentiles, throughput and goodput."""
    s = summary
    errors = ", ".join(f"{k}={v}" for k, v in sorted(s.errors.items())) or "none"
    label = f"{meta['label']}: " if meta.get("label") else ""
    lines = [
        f"## loadtest: {label}{meta.get('model')} at {meta.get('url')} "
        f"({meta.get('endpoint')}), {meta.get('started_at')}",
        "",
        _describe(meta),
        "",
        "| metric | mean | p50 | p90 | p95 | p99 | max | n |",
        "|---|---|---|---|---|---|---|---|",
        *(_latency_row(name, getattr(s, key)) for name, key in LATENCY_ROWS),
        "",
        "| requests ok/sent | duration s | req/s | in tok/s | out tok/s | total tok/s "
        "| goodput req/s | SLO attainment |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s.num_ok}/{s.num_requests} | {fmt(s.duration_s)} | {fmt(s.request_throughput)} "
        f"| {fmt(s.input_token_throughput, digits=1)} | {fmt(s.output_token_throughput, digits=1)} "
        f"| {fmt(s.total_token_throughput, digits=1)} | {fmt(s.goodput)} "
        f"| {fmt(s.attainment, 100, 1)}% |",
        "",
        f"SLOs: {', '.join(s.slos) or 'none (goodput = successful requests)'}"
        f"{'' if s.slos_held else ' (a percentile SLO is missed)'}; "
        f"errors: {errors}; mean tokens in/out: {fmt(s.prompt_tokens.mean, digits=1)}/"
        f"{fmt(s.output_tokens.mean, digits=1)}; cached prompt tokens: "
        f"{_cached(s)}",
    ]
    return "\n".join(lines) + "\n"


def _cached(s: Summary) -> str:
    """Prompt tokens from the server's prefix cache (usage.prompt_tokens_details)."""
    if s.cached_tokens is None:
        return "not reported"
    return f"{s.cached_tokens} ({fmt(s.cached_ratio, 100, 1)}% of the prompt tokens)"
