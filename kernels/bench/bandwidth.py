"""The device's copy bandwidth: the limit every memory-bound kernel and step is held against.

One measurement for all benchmarks (kernels, engine, KV transfer), so their "% of copy"
figures mean the same thing.
"""

from __future__ import annotations

import time

import torch


def copy_bandwidth(device: str | torch.device, nbytes: int = 2**31) -> float:
    """Bytes/s of a `copy_` of `nbytes` within one device, counting read + write bytes:
    triton's do_bench on CUDA, best of 5 wall-clock runs elsewhere."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if src.is_cuda:
        from triton.testing import do_bench

        seconds = do_bench(lambda: dst.copy_(src), warmup=10, rep=100) * 1e-3
    else:
        dst.copy_(src)  # warm-up: first touch of the pages
        seconds = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            seconds = min(seconds, time.perf_counter() - start)
    return 2 * nbytes / seconds
