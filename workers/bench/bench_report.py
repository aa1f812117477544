"""The engine benchmark's table (workers/bench/bench_engine.py): what ran where, decode-only
figures at batch 1 against the device's copy bandwidth, then one throughput row per system
with its ratio to the transformers baseline and how many greedy outputs match it."""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass

import torch

from workers.config import EngineConfig


@dataclass(frozen=True)
class BenchResult:
    name: str
    seconds: float
    outputs: list[list[int]]
    tpot: float | None = None
    """Seconds per decode step at batch 1."""
    step_bytes: int | None = None
    """Bytes one batch-1 decode step must read: weights (less the embedding, of which it
    reads one row) + the sequence's K/V at the mid-decode context."""
    graphs: bool = False
    """Whether decode steps replayed CUDA graphs."""

    def row(self, num_prompts: int, input_len: int, output_len: int) -> dict[str, float]:
        out_tokens = num_prompts * output_len
        return {
            "output tok/s": out_tokens / self.seconds,
            "prompts/s": num_prompts / self.seconds,
            "total tok/s": (out_tokens + num_prompts * input_len) / self.seconds,
        }


def decode_lines(results: list[BenchResult], copy_bps: float | None, context: int) -> list[str]:
    """The decode-only block: TPOT at batch 1 and the bandwidth it achieves."""
    step_bytes = next((r.step_bytes for r in results if r.step_bytes), None)
    copy = f"{copy_bps / 1e9:.0f} GB/s" if copy_bps else "not measured"
    lines = [
        f"decode only, batch 1, context ~{context} tokens; device copy bandwidth: {copy}",
        f"{'system':<14}{'TPOT ms':>10}{'GB/step':>10}{'GB/s':>10}{'% of copy':>11}",
    ]
    for result in results:
        if result.tpot is None or not step_bytes:
            continue
        achieved = step_bytes / result.tpot if result.tpot > 0 else float("inf")
        share = f"{100 * achieved / copy_bps:.0f}%" if copy_bps else "-"
        lines.append(
            f"{result.name:<14}{1e3 * result.tpot:>10.2f}{step_bytes / 1e9:>10.2f}"
            f"{achieved / 1e9:>10.0f}{share:>11}"
        )
    return lines + [""]


def agreement_line(results: list[BenchResult], baseline: BenchResult, output_len: int) -> str:
    """Mean common prefix with the baseline's greedy tokens: in bf16 the two roundings pick
    different tokens at near-ties, after which the sequences part; float32 matches exactly."""
    parts = []
    for result in results:
        if result is baseline:
            continue
        prefixes = []
        for ours, theirs in zip(result.outputs, baseline.outputs, strict=True):
            pairs = zip(ours, theirs, strict=False)
            differ = next((k for k, (a, b) in enumerate(pairs) if a != b), None)
            prefixes.append(min(len(ours), len(theirs)) if differ is None else differ)
        parts.append(f"{result.name} {sum(prefixes) / len(prefixes):.1f}")
    return f"greedy agreement, mean common prefix of {output_len} tokens: " + ", ".join(parts)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_table(
    args: argparse.Namespace,
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    results: list[BenchResult],
    copy_bps: float | None = None,
) -> str:
    """One table: what ran where, decode-only figures, then a row per system with the ratio
    to the baseline."""
    n, i, o = args.num_prompts, args.input_len, args.output_len
    graphs = "CUDA graphs (decode)" if any(r.graphs for r in results) else "eager"
    header = [
        f"device:    {device_name(device)}",
        f"model:     {config.model} ({'dummy weights' if args.dummy_config else 'checkpoint'})",
        f"dtype:     {str(dtype).removeprefix('torch.')}   attention: {config.attention_backend}"
        f"   engine: {graphs}   max_model_len: {config.max_model_len or 'model'}",
        f"workload:  {n} prompts x {i} input tokens -> {o} output tokens (greedy)",
        f"date:      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        *decode_lines(results, copy_bps, i + o // 2),
        f"{'system':<14}{'seconds':>10}{'output tok/s':>15}{'prompts/s':>12}"
        f"{'total tok/s':>14}{'vs HF':>8}{'greedy match':>15}",
    ]
    baseline = next((r for r in results if r.name == "transformers"), None)
    if baseline is not None:
        header[-1:-1] = [agreement_line(results, baseline, o), ""]
    for result in results:
        row = result.row(n, i, o)
        ratio = f"{baseline.seconds / result.seconds:.2f}x" if baseline else "-"
        match = "-"
        if baseline is not None:
            same = sum(a == b for a, b in zip(result.outputs, baseline.outputs, strict=True))
            match = f"{same}/{n}"
        header.append(
            f"{result.name:<14}{result.seconds:>10.3f}{row['output tok/s']:>15.1f}"
            f"{row['prompts/s']:>12.2f}{row['total tok/s']:>14.1f}{ratio:>8}{match:>15}"
        )
    return "\n".join(header)
