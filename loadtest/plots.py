"""PNG plots (matplotlib, Agg backend: no display needed): latency CDFs of one run, and
TTFT / TPOT / goodput against the offered load of a sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from loadtest.metrics import Summary  # noqa: E402
from loadtest.record import RequestRecord  # noqa: E402


def _cdf(ax, values: Sequence[float], title: str, unit: str = "requests") -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel(f"fraction of {unit}")
    ax.grid(alpha=0.3)
    if not values:
        ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        return
    xs = np.sort(np.asarray(values) * 1e3)
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")


def plot_latency_cdfs(records: Sequence[RequestRecord], path: Path) -> Path:
    """One PNG with the CDFs of TTFT, TPOT, ITL and E2E over the successful requests."""
    ok = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft for r in ok if r.ttft is not None],
        "TPOT": [r.tpot for r in ok if r.tpot is not None],
        "ITL": [gap for r in ok for gap in r.itl],
        "E2E": [r.e2e for r in ok if r.e2e is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, values) in zip(axes.flat, series.items(), strict=True):
        _cdf(ax, values, f"{title} CDF", "token gaps" if title == "ITL" else "requests")
    # Fixed margins: tight_layout would draw the figure twice, and plotting is most of a
    # short run's wall time on a busy CPU.
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.08, top=0.95, wspace=0.25, hspace=0.35)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _percentile_lines(xs: list[float], summaries: list[Summary], metric: str, xlabel: str,
                      path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stat in ("p50", "p90", "p99"):
        ys = [getattr(getattr(s, metric), stat) for s in summaries]
        ax.plot(xs, [np.nan if y is None else y * 1e3 for y in ys], marker="o", label=stat)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric.upper()} (ms)")
    ax.set_title(f"{metric.upper()} vs {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.12, top=0.92)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _goodput(xs: list[float], summaries: list[Summary], xlabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [s.request_throughput for s in summaries], marker="o", label="throughput")
    ax.plot(xs, [s.goodput for s in summaries], marker="s", label="goodput")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("requests/s")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(xs, [s.attainment * 100 for s in summaries], "g--", marker="^", label="SLO %")
    right.set_ylabel("SLO attainment (%)")
    right.set_ylim(0, 105)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="best")
    ax.set_title(f"goodput vs {xlabel}")
    fig.subplots_adjust(left=0.12, right=0.88, bottom=0.12, top=0.92)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_sweep(xs: list[float], summaries: list[Summary], xlabel: str, out_dir: Path) -> list[Path]:
    """ttft_vs_<x>.png, tpot_vs_<x>.png and goodput_vs_<x>.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = xlabel.split()[0]
    return [
        _percentile_lines(xs, summaries, "ttft", xlabel, out_dir / f"ttft_vs_{tag}.png"),
        _percentile_lines(xs, summaries, "tpot", xlabel, out_dir / f"tpot_vs_{tag}.png"),
        _goodput(xs, summaries, xlabel, out_dir / f"goodput_vs_{tag}.png"),
    ]
