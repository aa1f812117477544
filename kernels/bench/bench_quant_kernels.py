"""`python -m kernels.bench.bench_quant_kernels`: the weight-quantized matmuls one projection
at a time, against torch's bf16 matmul (cuBLAS) on the same shapes in the same run.

    python -m kernels.bench.bench_quant_kernels [--rows 1 32 512] [--eager]
    python -m kernels.bench.bench_quant_kernels --sweep [--rows 1 4]

Shapes are Llama-3-8B's projections (merged q/k/v, o, merged gate/up, down) at M = 1 and 32
rows (decode batch sizes) and 512 (a prefill chunk). Columns: microseconds per call, the ratio
to bf16, and the weight bandwidth (weight bytes / time; decode is bound by it). W4A16 uses
group size 128 with float16 scales and zero points (kernels/quant_w4a16.py); W8A16 int8 with
float32 channel scales; FP8 e4m3 with channel scales (kernels/quant_fp8.py: weight-only up to
64 rows, rows quantized per call and the FP8 tensor cores above, all included in its time).

Timing is what the engine's decode sees: calls replayed from a CUDA graph (no Python or launch
overhead), each call on another copy of the weights so that none is served from L2 (every
layer's weight is read once per step). --eager times plain calls instead (triton's do_bench,
L2 flushed), where host overhead shows wherever it exceeds the kernel.

--sweep times candidate launch configurations per shape and row count (default M = 1 and 32):
the matrix-vector kernels up to split_k.GEMV_MAX_ROWS rows, the tl.dot kernels above (W4A16's
with either nibble unpacking), for W4A16, W8A16 and FP8 weight-only (the channel kernels with
FP8 weights), and FP8's other paths (tensor cores, the row quantization alone), so the
defaults in kernels/quant_split_k.py, quant_w4a16.py and quant_w8a16.py can be picked from one
run; the best of each group is marked with *. --sweep-formats limits it to some of the formats.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.bench.bandwidth import copy_bandwidth
from kernels.quant_fp8 import FP8, fp8_linear, quantize_rows_fp8
from kernels.quant_split_k import GEMV_MAX_ROWS
from kernels.quant_w4a16 import w4a16_matmul
from kernels.quant_w8a16 import channel_matmul, w8a16_matmul

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096), "lm_head": (4096, 128256)}
"""Projection -> (K, N); the LM head only where asked for (--shapes), since checkpoints
usually keep it dense."""
DEFAULT_SHAPES = ["qkv", "o", "gate_up", "down"]
GROUP = 128
ROTATE_BYTES = 256 * 2**20
"""Weight copies per timed format: enough that one pass over them exceeds any L2 (50-60 MB)."""
GRAPH_CALLS = 64
"""Calls per CUDA graph replay."""

W4_SWEEP = [
    {"block_n": bn, "block_k": lanes * unit, "unit_k": unit, "num_warps": w, "num_stages": 1,
     "split": sp}
    for bn, lanes, unit, w in [(32, 32, 128, 4), (32, 64, 64, 8), (32, 64, 128, 8),
                               (32, 128, 32, 16), (32, 128, 64, 16), (32, 128, 128, 16),
                               (64, 32, 128, 8), (64, 64, 64, 16), (64, 64, 128, 16),
                               (16, 128, 64, 8), (16, 128, 128, 8)]
    for sp in (1, 2, 4)
]
"""W4A16 matrix-vector candidates (kernels/quant_w4a16_gemv.py): columns, lanes of unit_k
inputs (8 columns per thread at the warps given, 4 where doubled), explicit splits (a split
is whole block_k tiles, so past K / block_k they repeat)."""
CHANNEL_SWEEP = [
    {"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": 1, "prefetch": pf}
    for bn, bk, w in [(8, 512, 4), (16, 512, 4), (16, 256, 4), (8, 1024, 4), (32, 512, 8),
                      (8, 256, 2)]
    for pf in (True, False)
] + [{"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": 1, "split": sp}
     for bn, bk, w, sp in [(8, 512, 4, 2), (8, 512, 4, 4), (16, 512, 4, 4), (16, 256, 4, 8)]]
"""Matrix-vector candidates (rows up to GEMV_MAX_ROWS): tiles, warps, next-tile prefetch on
and off, explicit splits."""

W4_DOT_SWEEP = [{"row_unpack": True}] + [
    {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": w, "num_stages": st,
     "row_unpack": ru}
    for bm, bn, bk, w, st, ru in [(32, 64, 128, 4, 4, False), (32, 128, 128, 4, 3, False),
                                  (32, 64, 64, 4, 3, True), (32, 128, 64, 8, 3, True),
                                  (16, 64, 128, 4, 3, True), (32, 32, 128, 4, 3, False),
                                  (16, 64, 128, 4, 3, False), (16, 128, 128, 4, 3, False),
                                  (16, 64, 128, 4, 4, False), (16, 32, 128, 4, 3, False),
                                  (32, 64, 128, 8, 3, False), (64, 64, 128, 4, 3, False)]
]
CHANNEL_DOT_SWEEP = [
    {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": w, "num_stages": st}
    for bm, bn, bk, w, st in [(32, 64, 128, 4, 4), (32, 128, 128, 4, 3), (32, 64, 256, 4, 3),
                              (32, 128, 64, 8, 3), (16, 64, 128, 4, 3), (32, 32, 256, 4, 3)]
]
"""tl.dot candidates (rows above GEMV_MAX_ROWS)."""


def operands(k: int, n: int, device: str, copies: Callable[[int], int]) -> dict:
    """Random weights of one (K, N) projection in every format: format -> (list of one-argument
    callables, one per weight copy; weight bytes read per call)."""
    def dense():
        return torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02

    def w4():
        qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32,
                                device=device)
        scales = torch.rand(k // GROUP, n, device=device).half() * 0.01
        return qweight, scales, torch.full_like(scales, 8)

    def int8():
        return torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)

    def fp8():
        return dense().to(FP8)

    channel = torch.rand(n, device=device) * 1e-3
    bytes_of = {"bf16": 2 * n * k, "w8a16": n * k + 4 * n, "fp8": n * k + 4 * n,
                "w4a16": n * k // 2 + 4 * n * (k // GROUP)}
    weights = {"bf16": [dense() for _ in range(copies(bytes_of["bf16"]))],
               "w8a16": [int8() for _ in range(copies(bytes_of["w8a16"]))],
               "fp8": [fp8() for _ in range(copies(bytes_of["fp8"]))],
               "w4a16": [w4() for _ in range(copies(bytes_of["w4a16"]))]}
    return {"bytes": bytes_of, "weights": weights, "channel": channel}


def calls(fmt: str, ops: dict, launch: dict | None = None, fp8_path: str = "auto") -> list:
    """One callable per weight copy of `fmt`; `launch` a matrix-vector launch configuration,
    `fp8_path` auto / weight_only / tensor_cores / quantize (the row quantization alone)."""
    channel = ops["channel"]
    if fmt == "bf16":
        return [lambda x, w=w: F.linear(x, w) for w in ops["weights"]["bf16"]]
    if fmt == "w8a16":
        return [lambda x, w=w: w8a16_matmul(x, w, channel, launch)
                for w in ops["weights"]["w8a16"]]
    if fmt == "w4a16":
        return [lambda x, w=w: w4a16_matmul(x, *w, GROUP, launch=launch)
                for w in ops["weights"]["w4a16"]]
    assert fmt == "fp8", fmt
    if fp8_path == "quantize":
        return [lambda x: quantize_rows_fp8(x)]
    if fp8_path == "weight_only":
        return [lambda x, w=w: channel_matmul(x, w, channel, launch)
                for w in ops["weights"]["fp8"]]
    rows = {"auto": None, "tensor_cores": 0}[fp8_path]
    return [(lambda x, w=w: fp8_linear(x, w, channel)) if rows is None
            else (lambda x, w=w: fp8_linear(x, w, channel, weight_only_rows=rows))
            for w in ops["weights"]["fp8"]]


def time_us(fns: list, x: torch.Tensor, eager: bool) -> float:
    """Microseconds per call: replayed from a CUDA graph cycling through `fns` (one per weight
    copy), or with --eager triton's do_bench of the first."""
    from triton.testing import do_bench

    if eager:
        return do_bench(lambda: fns[0](x)) * 1e3
    for fn in fns:  # compile and warm up outside the graph
        fn(x)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i in range(GRAPH_CALLS):
            fns[i % len(fns)](x)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(5):
        start.record()
        for _ in range(4):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (4 * GRAPH_CALLS))
    return best


def header(eager: bool) -> None:
    print(f"device:  {torch.cuda.get_device_name()}   copy bandwidth "
          f"{copy_bandwidth('cuda', 2**30) / 1e9:.0f} GB/s")
    print(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}   "
          f"torch {torch.__version__}   activations bfloat16, Llama-3-8B projections, "
          f"{'eager calls (do_bench)' if eager else 'CUDA graph replay, weights rotated past L2'}"
          "\n")


def copies_for(eager: bool) -> Callable[[int], int]:
    return lambda nbytes: 1 if eager else max(1, math.ceil(ROTATE_BYTES / nbytes))


def table(rows: list[int], eager: bool, shapes: list[str]) -> None:
    formats = ["bf16", "w8a16", "fp8", "w4a16"]
    print(f"{'proj':<8}{'K x N':>12}{'M':>5}" + "".join(f"{f + ' us':>11}" for f in formats)
          + "".join(f"{f + ' x':>9}" for f in formats[1:])
          + "".join(f"{f + ' GB/s':>12}" for f in formats))
    for name, (k, n) in ((name, SHAPES[name]) for name in shapes):
        ops = operands(k, n, "cuda", copies_for(eager))
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = {f: time_us(calls(f, ops), x, eager) for f in formats}
            row = f"{name:<8}{f'{k}x{n}':>12}{m:>5}"
            row += "".join(f"{us[f]:>11.1f}" for f in formats)
            row += "".join(f"{us[f] / us['bf16']:>9.2f}" for f in formats[1:])
            row += "".join(f"{ops['bytes'][f] / us[f] / 1e3:>12.0f}" for f in formats)
            print(row)
        del ops
        torch.cuda.empty_cache()


def sweep(rows: list[int], eager: bool, shapes: list[str],
          formats: tuple[str, ...] = ("w4a16", "w8a16", "fp8")) -> None:
    """Every candidate per shape and row count: one line each, best per group starred."""
    print(f"{'proj':<8}{'M':>4}  {'kernel':<16}{'launch':<58}{'us':>9}{'x bf16':>8}{'GB/s':>8}")
    for name, (k, n) in ((name, SHAPES[name]) for name in shapes):
        ops = operands(k, n, "cuda", copies_for(eager))
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = time_us(calls("bf16", ops), x, eager)
            print(f"{name:<8}{m:>4}  {'bf16 cuBLAS':<16}{'':<58}{base:>9.1f}{1:>8.2f}"
                  f"{ops['bytes']['bf16'] / base / 1e3:>8.0f}")
            gemv = m <= GEMV_MAX_ROWS
            w4, channel = (W4_SWEEP, CHANNEL_SWEEP) if gemv else (W4_DOT_SWEEP, CHANNEL_DOT_SWEEP)
            groups = [("w4a16", "w4a16", w4, "auto"), ("w8a16", "w8a16", channel, "auto"),
                      ("fp8 weight-only", "fp8", channel, "weight_only")]
            for label, fmt, launches, path in groups:
                if fmt not in formats:
                    continue
                results = []
                for launch in [None, *launches]:
                    try:
                        us = time_us(calls(fmt, ops, launch, path), x, eager)
                    except Exception as error:  # noqa: BLE001 - a config that fails to compile
                        print(f"{name:<8}{m:>4}  {label:<16}{str(launch):<58} failed: "
                              f"{type(error).__name__}: {str(error)[:80]}")
                        continue
                    results.append((us, "default" if launch is None else launch))
                best = min(r[0] for r in results)
                for us, launch in results:
                    print(f"{name:<8}{m:>4}  {label:<16}{str(launch):<58}{us:>9.1f}"
                          f"{us / base:>8.2f}{ops['bytes'][fmt] / us / 1e3:>8.0f}"
                          f"{' *' if us == best else ''}")
            for path in ("tensor_cores", "quantize") if "fp8" in formats else ():
                us = time_us(calls("fp8", ops, None, path), x, eager)
                print(f"{name:<8}{m:>4}  {'fp8 ' + path:<16}{'':<58}{us:>9.1f}{us / base:>8.2f}")
        del ops
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="M values (default 1 32 512; 1 32 with --sweep)")
    parser.add_argument("--eager", action="store_true",
                        help="time plain calls (host overhead included) instead of graph replay")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES),
                        help=f"projections to time (default {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--sweep", action="store_true",
                        help="time candidate launch configurations per shape")
    parser.add_argument("--sweep-formats", nargs="+", default=["w4a16", "w8a16", "fp8"],
                        choices=["w4a16", "w8a16", "fp8"], help="formats --sweep times")
    args = parser.parse_args(argv)
    header(args.eager)
    if args.sweep:
        sweep(args.rows or [1, 32], args.eager, args.shapes, tuple(args.sweep_formats))
    else:
        table(args.rows or [1, 32, 512], args.eager, args.shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
