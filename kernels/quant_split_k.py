"""Launch shapes shared by the weight-streaming matmuls (kernels/quant_w4a16.py,
kernels/quant_w8a16.py): at decode sizes a matmul reads its whole weight for a handful of rows,
and its output tiles alone are too few to keep every SM streaming, so K is split across
programs whose float32 partial sums are added afterwards."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 264
"""About two programs per SM of an H100 (132 SMs)."""
MIN_SPLIT_ROWS = 512
"""A split streams at least this many rows of K (fewer make the partial sums dominate)."""
GEMV_MAX_ROWS = 4
"""Up to this many rows of x the matmuls run as matrix-vector products (one program per row
and column tile, broadcast multiply and a sum over K): tl.dot would pad M to 16 and send every
dequantized weight tile through shared memory for 1/16 of the tensor cores' work."""
GEMV_BLOCK_N = 32
"""Columns per program of the W4A16 matrix-vector form (the default of `gemv_launch`)."""


def split_k_config(m: int, n: int, k: int, block_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for an [m, k] x [k, n] weight-streaming matmul;
    `block_k` is the largest K tile the weight's layout allows."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if m <= 32 else 128
    if m > 64:
        return block_m, block_n, min(block_k, 64), 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    return block_m, block_n, block_k, splits_for(tiles, k)


def dot_launch(m: int, n: int, k: int, block_k: int, launch: dict | None = None) -> dict:
    """Launch configuration of a tl.dot form (m > GEMV_MAX_ROWS): block_m, block_n, block_k,
    split, num_warps, num_stages from `split_k_config`, any of them taken from `launch` (the
    benchmark's --sweep; split recomputed from the tiles unless given)."""
    block_m, block_n, block_k, split = split_k_config(m, n, k, block_k)
    config = {"block_m": block_m, "block_n": block_n, "block_k": block_k,
              "num_warps": 4, "num_stages": 3}
    config.update(launch or {})
    if "split" not in config:
        config["split"] = split if m > 64 else splits_for(
            triton.cdiv(m, config["block_m"]) * triton.cdiv(n, config["block_n"]), k)
    return config


def dot_plan(
    m: int, n: int, k: int, block_k: int, launch: dict | None,
    dtype: torch.dtype, device: torch.device,
) -> tuple[torch.Tensor, int, tuple[int, int, int], dict]:
    """Everything a tl.dot form's launch needs from `dot_launch` and `split_output`: (output
    buffer, rows of K per split, grid (m tiles, n tiles, splits), meta-parameters BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps, num_stages and any other key `launch` gave)."""
    config = dot_launch(m, n, k, block_k, launch)
    block_m, block_n = config.pop("block_m"), config.pop("block_n")
    block_k = config.pop("block_k")
    out, k_per_split, splits = split_output(m, n, k, block_k, config.pop("split"), dtype, device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    return out, k_per_split, grid, {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                    **config}


def splits_for(tiles: int, k: int) -> int:
    """How many ways to split K so that `tiles` output tiles make about TARGET_PROGRAMS
    programs, each streaming at least MIN_SPLIT_ROWS rows."""
    split = 1
    while tiles * split < TARGET_PROGRAMS and k // (split * 2) >= MIN_SPLIT_ROWS:
        split *= 2
    return split


def gemv_launch(
    m: int, n: int, k: int, block_k: int, launch: dict | None = None,
    block_n: int = GEMV_BLOCK_N,
) -> dict:
    """Launch configuration of a matrix-vector form (m <= GEMV_MAX_ROWS; one program per row
    of x and block_n columns): block_n, block_k, split, num_warps, num_stages, with any of
    them taken from `launch` (the benchmark's --sweep); split from the others by default."""
    config = {"block_n": block_n, "block_k": block_k, "num_warps": 4, "num_stages": 3}
    config.update(launch or {})
    if "split" not in config:
        config["split"] = splits_for(m * triton.cdiv(n, config["block_n"]), k)
    return config


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


REDUCE_BLOCK = 1024


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, splits, size, BLOCK: tl.constexpr):
    """out[i] = sum over s of part[s, i] (float32, in split order), rounded once to out's
    dtype: one launch where torch's sum and conversion would be two."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [m, n] result from `split_output`'s buffer once the kernel has filled it."""
    if out.dim() == 2:
        return out
    splits, m, n = out.shape
    result = torch.empty((m, n), dtype=dtype, device=out.device)
    if m * n > 0:
        _sum_splits_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
            out, result, splits, m * n, BLOCK=REDUCE_BLOCK)
    return result


def reduce_splits_ref(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Plain-torch reference of `reduce_splits` (the splits added in order, as the kernel
    does, so the two are bit-equal)."""
    if out.dim() == 2:
        return out
    acc = out[0].clone()
    for part in out[1:]:
        acc += part
    return acc.to(dtype)


@triton.jit
def load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, BLOCK_K: tl.constexpr):
    """Rows offs_m, columns [k0, k0 + BLOCK_K) of the activations x [M, K] (zeros outside)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    return tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=mask,
                   other=0.0)


@triton.jit
def store_tile(out_ptr, acc, pid_k, offs_m, offs_n, M, N, stride_os, stride_om):
    """Split pid_k's tile of the output ([M, N], or float32 partial sums [splits, M, N])."""
    out = out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gemv_program(N, K, k_per_split, BLOCK_N: tl.constexpr):
    """A matrix-vector program's (row of x, split, column offsets, in-N mask, first and end
    row of K): grid (rows, column tiles, splits)."""
    row, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    return row, pid_k, offs_n, offs_n < N, k_start, tl.minimum(k_start + k_per_split, K)


@triton.jit
def store_row(out_ptr, acc, pid_k, row, offs_n, N, stride_os, stride_om):
    """Split pid_k's columns offs_n of output row `row` (the matrix-vector kernels)."""
    out = out_ptr + pid_k * stride_os + row.to(tl.int64) * stride_om + offs_n
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)
