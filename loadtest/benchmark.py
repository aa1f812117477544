"""One benchmark: run the load, summarize, and write run.json, summary.md and latency_cdf.png.

This is what `run` does and what `sweep` does at each point; it is the library entry point
for other code that wants a run without the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.metrics import summarize
from loadtest.plots import plot_latency_cdfs
from loadtest.progress import progress_bar
from loadtest.report import RunDocument, markdown_run, write_run
from loadtest.runner import RunConfig, run
from loadtest.slo import SLO
from loadtest.workload import Workload


@dataclass(frozen=True)
class Outputs:
    json: Path
    markdown: Path
    plots: list[Path]


def run_meta(config: RunConfig, workload: Workload, slos: tuple[SLO, ...],
             source: str | None = None, label: str | None = None) -> dict[str, Any]:
    """How the run was made, as plain data for the JSON document and the markdown title.

    `source`: the prompts or trace file the workload came from; `label`: the user's note of
    what was measured (hardware, topology), which HTTP alone cannot know.
    """
    arrival = dataclasses.asdict(config.arrival)
    arrival["rate"] = str(arrival["rate"]) if arrival["rate"] == float("inf") else arrival["rate"]
    wl = workload.config
    return {
        "label": label,
        "url": config.endpoint.url,
        "request_url": config.endpoint.request_url,
        "model": config.endpoint.model,
        "endpoint": config.endpoint.endpoint,
        "ignore_eos": config.endpoint.ignore_eos,
        "timeout_s": config.endpoint.timeout_s,
        "arrival": arrival,
        "workload": {"kind": wl.kind, "input_len": _length(wl.input_len),
                     "output_len": _length(wl.output_len),
                     "shared_prefix_len": wl.shared_prefix_len, "source": source,
                     "prompt_format": wl.prompt_format, "vocab_size": wl.vocab_size},
        "num_requests": config.num_requests,
        "duration_s": config.duration_s,
        "global_timeout_s": config.global_timeout_s,
        "seed": config.seed,
        "slos": [str(s) for s in slos],
    }


def _length(rng) -> str:
    return str(rng.low) if rng.low == rng.high else f"{rng.low}:{rng.high}"


def benchmark(config: RunConfig, workload: Workload, slos: tuple[SLO, ...], out_dir: Path,
              trace_times: list[float] | None = None, progress: bool = True,
              progress_label: str = "requests", source: str | None = None,
              label: str | None = None) -> tuple[RunDocument, Outputs]:
    """Run once and write its files into out_dir; returns the document and the file paths."""
    total = min((n for n in (config.num_requests, workload.size) if n is not None), default=None)
    with progress_bar(total, progress_label, progress) as on_done:
        result = run(config, workload, trace_times, on_done)
    summary = summarize(result.records, result.duration_s, slos)
    meta = {**run_meta(config, workload, slos, source, label), "started_at": result.started_at}
    doc = RunDocument(meta, summary, result.records)
    table = markdown_run(meta, summary)
    markdown = out_dir / "summary.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown.write_text(table)
    outputs = Outputs(write_run(doc, out_dir / "run.json"), markdown,
                      [plot_latency_cdfs(result.records, out_dir / "latency_cdf.png")])
    return doc, outputs
