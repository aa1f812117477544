"""`python -m kernels.bench.bench_quant_kernels`: the weight-quantized matmuls one projection
at a time, against torch's bf16 matmul (cuBLAS) on the same shapes in the same run.

Shapes are Llama-3-8B's projections (merged q/k/v, o, merged gate/up, down) at M = 1 and 32
rows (decode batch sizes) and 512 (a prefill chunk). Columns: microseconds per call, the ratio
to bf16, and the weight bandwidth (weight bytes / time; decode is bound by it). W4A16 uses
group size 128 with float16 scales and zero points (kernels/quant_w4a16.py); W8A16 int8 with
float32 channel scales; FP8 e4m3 with channel scales on the tensor cores (rows quantized per
call, included in its time).
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kernels.bench.bandwidth import copy_bandwidth
from kernels.quant_fp8 import FP8, fp8_linear
from kernels.quant_w4a16 import w4a16_matmul
from kernels.quant_w8a16 import w8a16_matmul

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
"""Projection -> (K, N)."""
GROUP = 128


def operands(k: int, n: int, device: str) -> dict[str, tuple]:
    """Random weights of one (K, N) projection in every format, and each format's bytes."""
    dense = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    scales = torch.rand(k // GROUP, n, device=device).half() * 0.01
    zeros = torch.full_like(scales, 8)
    int8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    channel = torch.rand(n, device=device) * 1e-3
    fp8 = dense.to(FP8)
    return {
        "bf16": (lambda x: F.linear(x, dense), dense.numel() * 2),
        "w8a16": (lambda x: w8a16_matmul(x, int8, channel), int8.numel() + 4 * n),
        "fp8": (lambda x: fp8_linear(x, fp8, channel), fp8.numel() + 4 * n),
        "w4a16": (lambda x: w4a16_matmul(x, qweight, scales, zeros, GROUP),
                  qweight.numel() * 4 + scales.numel() * 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 512])
    args = parser.parse_args(argv)
    device = "cuda"
    print(f"device:  {torch.cuda.get_device_name()}   copy bandwidth "
          f"{copy_bandwidth(device, 2**30) / 1e9:.0f} GB/s")
    print(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}   "
          f"torch {torch.__version__}   activations bfloat16, Llama-3-8B projections\n")
    formats = ["bf16", "w8a16", "fp8", "w4a16"]
    print(f"{'proj':<8}{'K x N':>12}{'M':>5}" + "".join(f"{f + ' us':>11}" for f in formats)
          + "".join(f"{f + ' x':>9}" for f in formats[1:])
          + "".join(f"{f + ' GB/s':>12}" for f in formats))
    for name, (k, n) in SHAPES.items():
        ops = operands(k, n, device)
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ms = {f: do_bench(lambda op=ops[f][0], x=x: op(x)) for f in formats}
            row = f"{name:<8}{f'{k}x{n}':>12}{m:>5}"
            row += "".join(f"{ms[f] * 1e3:>11.1f}" for f in formats)
            row += "".join(f"{ms[f] / ms['bf16']:>9.2f}" for f in formats[1:])
            row += "".join(f"{ops[f][1] / ms[f] / 1e6:>12.0f}" for f in formats)
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
