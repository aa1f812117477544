"""Launch shapes shared by the weight-streaming matmuls (kernels/quant_w4a16.py,
kernels/quant_w8a16.py): at decode sizes a matmul reads its whole weight for a handful of rows,
and its output tiles alone are too few to keep every SM streaming, so K is split across
programs whose float32 partial sums are added afterwards."""

from __future__ import annotations

import torch
import triton

TARGET_PROGRAMS = 264
"""About two programs per SM of an H100 (132 SMs)."""
MIN_SPLIT_ROWS = 512
"""A split streams at least this many rows of K (fewer make the partial sums dominate)."""


def split_k_config(m: int, n: int, k: int, block_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for an [m, k] x [k, n] weight-streaming matmul;
    `block_k` is the largest K tile the weight's layout allows."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if m <= 32 else 128
    if m > 64:
        return block_m, block_n, min(block_k, 64), 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = 1
    while tiles * split < TARGET_PROGRAMS and k // (split * 2) >= MIN_SPLIT_ROWS:
        split *= 2
    return block_m, block_n, block_k, split


def split_output(
    m: int, n: int, k: int, block_k: int, split: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, int, int]:
    """(output buffer, rows of K per split, number of splits). The buffer is [m, n] in `dtype`
    without a split, float32 [splits, m, n] partial sums with one. Splits are whole K tiles,
    so there may be fewer than asked."""
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    if splits == 1:
        return torch.empty((m, n), dtype=dtype, device=device), k_per_split, 1
    return torch.empty((splits, m, n), dtype=torch.float32, device=device), k_per_split, splits


def reduce_splits(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [m, n] result from `split_output`'s buffer once the kernel has filled it."""
    return out if out.dim() == 2 else out.sum(0).to(dtype)
