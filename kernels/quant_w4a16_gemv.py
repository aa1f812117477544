"""The matrix-vector form of the W4A16 matmul (kernels/quant_w4a16.py: the layout, and the
tl.dot form above split_k.GEMV_MAX_ROWS rows): one row of x times a tile of columns per
program, K split across programs where the columns alone give too few.

It reads each packed word once and widens its nibbles with one logic op per weight (each
masked nibble read as a float32 denormal, `_nibble_products`) rather than int -> float
conversions, which run at a quarter of the ALU rate and made an earlier form (one conversion
per weight, ~0.5 TB/s on an H100) compute-bound; see the kernel's docstring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels import quant_split_k as split_k
from kernels.quant_split_k import (
    PRODUCT_SCALE,
    X_SCALE0,
    X_SCALE4,
    X_SCALE8,
    X_SCALE12,
    X_SCALE16,
    gemv_program,
    load_x,
    store_row,
)

GEMV_TILE = {"block_n": 32, "block_k": 512}
"""Default tile of the matrix-vector form (columns, input rows), next tile not prefetched."""
GEMV_FEW_COLUMNS = {"block_n": 16, "block_k": 1024, "prefetch": True, "split": 1}
"""The form's launch where 32-column tiles would give fewer than split_k.TARGET_PROGRAMS
programs over K <= GEMV_FEW_COLUMNS_MAX_K: twice the programs with no split (no partial sums)
and two 8 KB weight tiles in flight per program; otherwise K is split across 8 warps. The best
per projection of Llama-3-8B at M = 1 on an H200 (devrun sweep, two passes, 2026-11-28 10:47
UTC, us): q/k/v 6.8 vs 10.5 with the default tile, o 6.4 vs 7.1, down (split, 8 warps) 15.3 vs
16.7; gate_up (896 column tiles) keeps the default, 25.1."""
GEMV_FEW_COLUMNS_MAX_K = 4096


def gemv_defaults(m: int, n: int, k: int) -> dict:
    """The matrix-vector form's launch for an [m, k] x [k, n] product (see GEMV_FEW_COLUMNS)."""
    if split_k.column_tiles(m, n, GEMV_TILE["block_n"]) >= split_k.TARGET_PROGRAMS:
        return dict(GEMV_TILE)
    if k <= GEMV_FEW_COLUMNS_MAX_K:
        return dict(GEMV_FEW_COLUMNS)
    return {**GEMV_TILE, "num_warps": 8}


@triton.jit
def _nibble_denormal(word, p: tl.constexpr):
    """q 2^(p - 149) for the nibble q at bits p..p+3 of every word (p <= 19): masked in place
    it is the mantissa of a float32 whose exponent bits are zero, a denormal, exactly, in one
    logic op. Float32 arithmetic keeps denormals at full speed on the GPU (Triton emits no
    flush-to-zero) and in numpy (TRITON_INTERPRET)."""
    return (word & (0xF << p)).to(tl.float32, bitcast=True)


@triton.jit
def _nibble_products(packed, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum_j x_j q_j 2^(X_EXP - 149) per word, [W, BLOCK_N] in float32, for x_j [W] the input
    row of nibble j of each word row. Nibbles 0..4 (bits 0..19) are read in place; 5..7 lie
    at bits 8..19 of word >> 12. Each product x_j 2^(X_EXP - p) * q 2^(p - 149) is exact
    before its one rounding, as a plain float32 x q would be."""
    hi = packed >> 12
    part = (x0 * X_SCALE0)[:, None] * _nibble_denormal(packed, 0)
    part += (x1 * X_SCALE4)[:, None] * _nibble_denormal(packed, 4)
    part += (x2 * X_SCALE8)[:, None] * _nibble_denormal(packed, 8)
    part += (x3 * X_SCALE12)[:, None] * _nibble_denormal(packed, 12)
    part += (x4 * X_SCALE16)[:, None] * _nibble_denormal(packed, 16)
    part += (x5 * X_SCALE8)[:, None] * _nibble_denormal(hi, 8)
    part += (x6 * X_SCALE12)[:, None] * _nibble_denormal(hi, 12)
    part += (x7 * X_SCALE16)[:, None] * _nibble_denormal(hi, 16)
    return part


@triton.jit
def _x_by_nibble(x_row, k_w, w_ok, inter, GATED: tl.constexpr):
    """x[k_w + j] for j = 0..7 (the input rows of nibble j of each packed row), from one
    [BLOCK_K / 8, 8] load split into eight [BLOCK_K / 8] columns, as float32 (GATED: see
    quant_split_k.load_x)."""
    x = load_x(x_row + k_w[:, None] + tl.arange(0, 8)[None, :], w_ok[:, None], inter,
               GATED).to(tl.float32)
    # [W, 8] -> [W, a, b, c] with j = 4a + 2b + c; each split takes the last axis.
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2, 2)))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _load_w4_words(qw_ptr, s_ptr, z_ptr, k0, k_end, offs_w, offs_n, n_ok, group_size,
                   stride_qk, stride_sg, GROUP_PER_TILE: tl.constexpr):
    """Packed rows [k0 / 8, k0 / 8 + BLOCK_K / 8) of the weight's columns offs_n (zeros at or
    past k_end), their groups' scales and zeros as float32 ([1, BLOCK_N] when the tile lies in
    one group, else one row per packed row), the tile's first input row per packed row, and
    which packed rows are real."""
    k_w = k0 + offs_w * 8
    w_ok = k_w < k_end
    packed = tl.load(
        qw_ptr + (k_w // 8)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
        mask=w_ok[:, None] & n_ok[None, :], other=0,
    )
    if GROUP_PER_TILE:
        g_off = (k0 // group_size) * stride_sg + offs_n[None, :]
        g_ok = (n_ok & (offs_n * 0 + k0 < k_end))[None, :]  # no read past the last tile
    else:
        g_off = (k_w // group_size)[:, None] * stride_sg + offs_n[None, :]
        g_ok = w_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)
    return packed, s, z, k_w, w_ok


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    N, K, group_size, k_per_split,
    stride_xm, stride_qk, stride_sg, stride_os, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_PER_TILE: tl.constexpr, MIN_FORM: tl.constexpr, PREFETCH: tl.constexpr,
    GATED: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """One row of x (program axis 0) times BLOCK_N columns over split pid_k's rows of K.

    Each packed word [BLOCK_K / 8, BLOCK_N] is loaded once, and x once per tile (one
    [BLOCK_K / 8, 8] load split by nibble). `_nibble_products` gives sum_j x[8i + j] q_j per
    word row with one logic op and one multiply-add per weight; with X = sum_j x[8i + j],
    sum_j x (q - z) = that - z X (min form: s times it, plus m X), so no subtraction runs per
    weight and the group scale is applied once per word (a packed row lies inside one group:
    group sizes are multiples of 8). The sum over K is taken once after the loop. This
    widening halved the logic ops of the previous one (a shift and a logic op per weight into
    1 + q / 16): 78.9 -> 59.7 us over Llama-3-8B's four projections at M = 1 on an H200
    (devrun A/B, 2026-11-28 10:38 UTC), the decode graph 2.69 -> 2.31 ms. PREFETCH: the next
    tile's loads are issued before this tile's arithmetic (two tiles in flight per program;
    Triton pipelines only loads that feed tl.dot)."""
    row, pid_k, offs_n, n_ok, k_start, k_end = gemv_program(N, K, k_per_split, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    packed, s, z, k_w, w_ok = _load_w4_words(qw_ptr, s_ptr, z_ptr, k_start, k_end, offs_w,
                                             offs_n, n_ok, group_size, stride_qk, stride_sg,
                                             GROUP_PER_TILE)
    pdl.enter(PDL)  # after the first tile's weight loads: they never depend on the step
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            n_packed, n_s, n_z, n_k_w, n_w_ok = _load_w4_words(
                qw_ptr, s_ptr, z_ptr, k0 + BLOCK_K, k_end, offs_w, offs_n, n_ok, group_size,
                stride_qk, stride_sg, GROUP_PER_TILE)
        xs = _x_by_nibble(x_row, k_w, w_ok, K, GATED)
        x_sum = ((xs[0] + xs[1]) + (xs[2] + xs[3])) + ((xs[4] + xs[5]) + (xs[6] + xs[7]))
        x_q = _nibble_products(packed, xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6],
                               xs[7]) * PRODUCT_SCALE  # sum_j x q per word row
        if MIN_FORM:  # sum x (q s + m) = s sum x q + m sum x
            acc += x_q * s + x_sum[:, None] * z
        else:
            acc += (x_q - z * x_sum[:, None]) * s
        if PREFETCH:
            packed, s, z, k_w, w_ok = n_packed, n_s, n_z, n_k_w, n_w_ok
        else:
            packed, s, z, k_w, w_ok = _load_w4_words(
                qw_ptr, s_ptr, z_ptr, k0 + BLOCK_K, k_end, offs_w, offs_n, n_ok, group_size,
                stride_qk, stride_sg, GROUP_PER_TILE)
    store_row(out_ptr, part_ptr, count_ptr, tl.sum(acc, axis=0), row, offs_n, N, stride_os,
              stride_om, SPLIT)


def w4a16_gemv(
    x, qweight, scales, zeros, group_size: int, min_form: bool, *,
    block_n: int, block_k: int, split: int, num_warps: int, num_stages: int,
    prefetch: bool = False, gated: bool = False,
) -> torch.Tensor:
    """quant_w4a16.w4a16_matmul's matrix-vector form with an explicit launch configuration
    (the benchmark's --sweep times several). A K tile inside one group reads one row of
    scales and zeros; a longer one reads a row per packed row."""
    m, n, k = x.shape[0], qweight.shape[1], qweight.shape[0] * 8
    out = split_k.split_output(m, n, k, block_k, split, x.dtype, x.device,
                               (m, triton.cdiv(n, block_n)))
    _w4a16_gemv_kernel[out.grid](
        x, qweight, scales, zeros, out.out, out.parts, out.counts,
        n, k, group_size, out.k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.part_stride, n,
        BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_PER_TILE=group_size % block_k == 0, MIN_FORM=min_form, PREFETCH=prefetch,
        GATED=gated, SPLIT=out.split, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch(x.device),
    )
    return out.out
