"""torch.profiler tables for the benchmarks' --profile options: where a step's GPU time and
host time go, kernel by kernel (CUDA graph replays included: CUPTI records their kernels)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def print_profile(run: Callable[[], None], label: str, rows: int = 20) -> None:
    """Runs `run` under torch.profiler and prints its GPU-kernel table (on CUDA) and its
    host-op table, `rows` lines each, headed by `label`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run()
    averages = prof.key_averages()
    if torch.cuda.is_available():
        print(f"profile of {label}, by GPU time:")
        print(averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))
    print(f"profile of {label}, by host time:")
    print(averages.table(sort_by="cpu_time_total", row_limit=rows, max_name_column_width=60))
