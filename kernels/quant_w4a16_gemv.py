"""The matrix-vector form of the W4A16 matmul (kernels/quant_w4a16.py: the layout, and the
tl.dot form above split_k.GEMV_MAX_ROWS rows): one row of x times a tile of columns per
program (K may be split across programs, a launch option the defaults no longer take).

It reads each packed word once and widens its nibbles with one logic op per weight (each
masked nibble read as a float32 denormal, `_nibble_fma`) rather than int -> float
conversions, which run at a quarter of the ALU rate and made an earlier form (one conversion
per weight, ~0.5 TB/s on an H100) compute-bound.

At batch 1 the form is bound by instruction issue, not bytes: an H200 delivers ~37 weights per
SM per cycle at 4 bits, and an SM issues 128 thread-instructions per cycle, so the loop may
spend ~3.5 instructions per weight. Hence the group-major walk (see the kernel): the group's
scale and zero are applied once per unit of rows rather than once per packed word.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels import quant_split_k as split_k
from kernels.norm_handoff import (
    AddNorm,
    NormedRows,
    norm_launch,
    norm_weight,
    residual_row,
    rstd,
    square_parts,
    store_row_add_norm,
)
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

UNIT_ROWS = 4
"""Packed rows (32 inputs) one iteration of a lane walks: a unit is a multiple of it."""
BLOCK_N = 32
"""Default columns per program: 8 per thread, so 8 lanes per warp."""
MANY_LANES = 128
"""Most lanes per program where the column tiles are few (under split_k.TARGET_PROGRAMS):
enough to take all of K in one sweep, each lane a few iterations, since latency, not issue,
bounds those small matrices."""
FEW_LANES = 32
"""Most lanes per program where the column tiles alone fill the GPU (4 warps walk K)."""
MAX_UNIT_K = 128
SHORT_UNIT_K = 64
"""Inputs per scale application: MAX_UNIT_K, or SHORT_UNIT_K where the columns are few and K
fits 64 lanes of it (two iterations per lane)."""


def gemv_supports(group_size: int) -> bool:
    """The form needs units of whole iterations inside one group: group sizes that are
    multiples of 32 (every GPTQ, AWQ and GGUF 4-bit layout); others take the tl.dot form."""
    return group_size % (8 * UNIT_ROWS) == 0


def default_unit_k(group_size: int, limit: int = MAX_UNIT_K) -> int:
    """The largest multiple of 32 up to `limit` dividing the group size (a whole group of 32,
    64 or 128; 128 of a per-channel group)."""
    return math.gcd(group_size, limit)


def whole_tiles(n: int, k: int, block_n: int, block_k: int) -> bool:
    """The kernel's EVEN: the columns and K fill whole tiles (every split's too, since splits
    are whole K tiles), so no load needs a mask."""
    return n % block_n == 0 and k % block_k == 0


def gemv_defaults(m: int, n: int, k: int, group_size: int) -> dict:
    """The form's launch for an [m, k] x [k, n] product: no split (its partial sums and
    arrival counters cost ~2 us, more than they save at these sizes). Best of the sweep per
    projection of Llama-3-8B at M = 1 on an H200 (`bench_quant_kernels --sweep`, 2026-11-28
    16:40 UTC, us): gate_up 20.7 with 32 lanes of 128 (896 column tiles), o 5.4 and q/k/v 7.0
    with 64 lanes of 64, down 13.8 with 128 lanes of 128 (13.5 split 4 ways)."""
    lanes_max, unit_k = FEW_LANES, default_unit_k(group_size)
    if split_k.column_tiles(m, n, BLOCK_N) < split_k.TARGET_PROGRAMS:
        lanes_max = MANY_LANES
        short = default_unit_k(group_size, SHORT_UNIT_K)
        if triton.cdiv(k, short) <= MANY_LANES // 2:
            unit_k = short
    lanes = min(lanes_max, triton.next_power_of_2(triton.cdiv(k, unit_k)))
    return {"block_n": BLOCK_N, "block_k": lanes * unit_k, "unit_k": unit_k, "split": 1,
            "num_warps": max(1, lanes * BLOCK_N // 256), "num_stages": 1}


@triton.jit
def _nibble_denormal(word, p: tl.constexpr):
    """q 2^(p - 149) for the nibble q at bits p..p+3 of every word (p <= 19): masked in place
    it is the mantissa of a float32 whose exponent bits are zero, a denormal, exactly, in one
    logic op. Float32 arithmetic keeps denormals at full speed on the GPU (Triton emits no
    flush-to-zero) and in numpy (TRITON_INTERPRET)."""
    return (word & (0xF << p)).to(tl.float32, bitcast=True)


@triton.jit
def _nibble_fma(part, packed, x0, x1, x2, x3, x4, x5, x6, x7):
    """part + sum_j x_j q_j 2^(X_EXP - 149) per word ([LANES, BLOCK_N] float32), for x_j
    [LANES] the input of nibble j of each lane's packed row: one logic op and one multiply-add
    per weight, chained into `part`. Nibbles 0..4 (bits 0..19) are read in place; 5..7 lie at
    bits 8..19 of word >> 12. Each product x_j 2^(X_EXP - p) * q 2^(p - 149) is exact before
    its one rounding, as a plain float32 x q would be."""
    hi = packed >> 12
    part = part + (x0 * X_SCALE0)[:, None] * _nibble_denormal(packed, 0)
    part = part + (x1 * X_SCALE4)[:, None] * _nibble_denormal(packed, 4)
    part = part + (x2 * X_SCALE8)[:, None] * _nibble_denormal(packed, 8)
    part = part + (x3 * X_SCALE12)[:, None] * _nibble_denormal(packed, 12)
    part = part + (x4 * X_SCALE16)[:, None] * _nibble_denormal(packed, 16)
    part = part + (x5 * X_SCALE8)[:, None] * _nibble_denormal(hi, 8)
    part = part + (x6 * X_SCALE12)[:, None] * _nibble_denormal(hi, 12)
    part = part + (x7 * X_SCALE16)[:, None] * _nibble_denormal(hi, 16)
    return part


@triton.jit
def _row_products(part, x_sum, packed, xp, row_ok, inter, EVEN: tl.constexpr,
                  GATED: tl.constexpr):
    """One packed row per lane (inputs at xp [LANES], 8 each): (part plus its products,
    x_sum plus its inputs). The [LANES, 8] load is split into eight [LANES] columns."""
    x = load_x(xp[:, None] + tl.arange(0, 8)[None, :], row_ok[:, None], inter, GATED,
               EVEN).to(tl.float32)
    # [LANES, 8] -> [LANES, a, b, c] with j = 4a + 2b + c; each split takes the last axis.
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2, 2)))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    x_sum += ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    return _nibble_fma(part, packed, x0, x1, x2, x3, x4, x5, x6, x7), x_sum


@triton.jit
def _two_rows(wp, stride_qk, row, w_end, n_ok, EVEN: tl.constexpr):
    """Packed rows `row` and `row + 1` of each lane ([LANES] rows, pointers wp
    [LANES, BLOCK_N] at the first); zeros past w_end or N."""
    if EVEN:
        return tl.load(wp), tl.load(wp + stride_qk)
    a = tl.load(wp, mask=(row < w_end)[:, None] & n_ok[None, :], other=0)
    b = tl.load(wp + stride_qk, mask=(row + 1 < w_end)[:, None] & n_ok[None, :], other=0)
    return a, b


@triton.jit
def _group_scales(s_ptr, z_ptr, row, w_end, group_words, offs_n, n_ok, stride_sg,
                  EVEN: tl.constexpr):
    """The scales and zeros [LANES, BLOCK_N] of the groups holding each lane's packed `row`."""
    g_off = (row // group_words)[:, None] * stride_sg + offs_n[None, :]
    if EVEN:
        return tl.load(s_ptr + g_off), tl.load(z_ptr + g_off)
    g_ok = (row < w_end)[:, None] & n_ok[None, :]
    return (tl.load(s_ptr + g_off, mask=g_ok, other=0.0),
            tl.load(z_ptr + g_off, mask=g_ok, other=0.0))


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    N, K, group_words, unit_words, k_per_split,
    stride_xm, stride_qk, stride_sg, stride_os, stride_om,
    sq_in_ptr, stride_sq_in, n_parts, eps,
    res_ptr, stride_res, scaled_ptr, norm_w_ptr, sq_out_ptr,
    BLOCK_N: tl.constexpr, LANES: tl.constexpr, MIN_FORM: tl.constexpr,
    EVEN: tl.constexpr, GATED: tl.constexpr, SPLIT: tl.constexpr,
    NORMED: tl.constexpr, PARTS: tl.constexpr, ADD_NORM: tl.constexpr, PDL: tl.constexpr,
):
    """One row of x (program axis 0) times BLOCK_N columns over split pid_k's rows of K,
    walked group-major: lane c of LANES takes the c-th unit of `unit_words` packed rows (a
    unit lies inside one group), four rows per iteration, then jumps LANES units on.

    Within a unit the products of every row chain into one float32 `part` per lane and column
    (one logic op and one multiply-add per weight) and the inputs into `x_sum`; at the unit's
    end, with X = x_sum, sum x (q - z) s = s (part - z X) (min form: s part + m X), once per
    unit rather than once per word. Each thread holds 8 columns of one lane, so the scales and
    zeros convert once per unit and the inputs once per 8 words. Two rows are in flight while
    two are multiplied. The sum over lanes is taken once after the loop. EVEN: the columns and
    the split's K fill whole tiles (no masks). NORMED: x is a NormedRows' `scaled` and the
    sums are scaled by its row's rstd; ADD_NORM: the epilogue of AddNorm
    (kernels/norm_handoff.py)."""
    row, pid_k, offs_n, n_ok, k_start, k_end = gemv_program(N, K, k_per_split, BLOCK_N)
    w_end = k_end // 8
    span = LANES * unit_words
    lane_row = k_start // 8 + tl.arange(0, LANES) * unit_words
    wp = qw_ptr + lane_row[:, None].to(tl.int64) * stride_qk + offs_n[None, :]
    xp = x_ptr + row.to(tl.int64) * stride_xm + lane_row * 8
    a, b = _two_rows(wp, stride_qk, lane_row, w_end, n_ok, EVEN)
    s, z = _group_scales(s_ptr, z_ptr, lane_row, w_end, group_words, offs_n, n_ok, stride_sg,
                         EVEN)
    norm_w = norm_weight(norm_w_ptr, offs_n, N, ADD_NORM)
    pdl.enter(PDL)  # after the first rows' weight loads: they never depend on the step
    parts = square_parts(sq_in_ptr, row, stride_sq_in, n_parts, NORMED, PARTS)
    residual = residual_row(res_ptr, row, stride_res, offs_n, N, ADD_NORM)
    acc = tl.zeros((LANES, BLOCK_N), dtype=tl.float32)
    part = tl.zeros((LANES, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((LANES,), dtype=tl.float32)
    done = 0  # rows of the current unit already multiplied
    iterations = tl.cdiv(w_end - k_start // 8, span) * (unit_words // 4)
    for i in range(iterations):
        c, d = _two_rows(wp + 2 * stride_qk, stride_qk, lane_row + 2, w_end, n_ok, EVEN)
        part, x_sum = _row_products(part, x_sum, a, xp, lane_row < w_end, K, EVEN, GATED)
        part, x_sum = _row_products(part, x_sum, b, xp + 8, lane_row + 1 < w_end, K, EVEN,
                                    GATED)
        done += 4
        unit_end = done == unit_words
        step = 4
        if unit_end:
            step += span - unit_words
        if i == iterations - 1:
            step = 0  # the last prefetch rereads these rows rather than past the weight
        wp += step * stride_qk
        a, b = _two_rows(wp, stride_qk, lane_row + step, w_end, n_ok, EVEN)
        part, x_sum = _row_products(part, x_sum, c, xp + 16, lane_row + 2 < w_end, K, EVEN,
                                    GATED)
        part, x_sum = _row_products(part, x_sum, d, xp + 24, lane_row + 3 < w_end, K, EVEN,
                                    GATED)
        lane_row += step
        xp += step * 8
        if unit_end:
            s_unit = s.to(tl.float32) * PRODUCT_SCALE
            if MIN_FORM:
                acc += part * s_unit + x_sum[:, None] * z.to(tl.float32)
            else:
                acc += (part - x_sum[:, None] * (z.to(tl.float32) / PRODUCT_SCALE)) * s_unit
            part = tl.zeros((LANES, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((LANES,), dtype=tl.float32)
            done = 0
            s, z = _group_scales(s_ptr, z_ptr, lane_row, w_end, group_words, offs_n, n_ok,
                                 stride_sg, EVEN)
    y = tl.sum(acc, axis=0) * rstd(parts, K, eps, NORMED)
    if ADD_NORM:
        store_row_add_norm(out_ptr, y, row, offs_n, N, stride_om, residual, norm_w,
                           scaled_ptr, sq_out_ptr)
    else:
        store_row(out_ptr, part_ptr, count_ptr, y, row, offs_n, N, stride_os, stride_om, SPLIT)


def w4a16_gemv(
    x, qweight, scales, zeros, group_size: int, min_form: bool, *,
    block_n: int, block_k: int, split: int, num_warps: int, num_stages: int = 1,
    unit_k: int | None = None, gated: bool = False, add_norm: AddNorm | None = None,
) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
    """quant_w4a16.w4a16_matmul's matrix-vector form with an explicit launch configuration
    (the benchmark's --sweep times several): `block_k` inputs per program per sweep, in lanes
    of `unit_k` (default `default_unit_k`; a multiple of 32 dividing the group size, and
    block_k / unit_k a power of two). x may be NormedRows; with `add_norm` it returns
    (NormedRows for the next matmul, the new residual) (kernels/norm_handoff.py)."""
    m, n, k = x.shape[0], qweight.shape[1], qweight.shape[0] * 8
    unit_k = unit_k or default_unit_k(group_size)
    lanes = block_k // unit_k
    assert gemv_supports(group_size) and unit_k % 32 == 0 and group_size % unit_k == 0, (
        f"unit of {unit_k} inputs for group size {group_size}")
    assert lanes * unit_k == block_k and lanes & (lanes - 1) == 0, (
        f"block_k {block_k} is not a power-of-two count of {unit_k}-input units")
    out = split_k.split_output(m, n, k, block_k, split, x.dtype, qweight.device,
                               (m, triton.cdiv(n, block_n)))
    x, norm_args, handed = norm_launch(x, add_norm, out, n)
    _w4a16_gemv_kernel[out.grid](
        x, qweight, scales, zeros, out.out, out.parts, out.counts,
        n, k, group_size // 8, unit_k // 8, out.k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.part_stride, n,
        BLOCK_N=block_n, LANES=lanes, MIN_FORM=min_form,
        EVEN=whole_tiles(n, k, block_n, block_k), GATED=gated, SPLIT=out.split,
        num_warps=num_warps, num_stages=num_stages, **norm_args, **pdl.launch(x.device),
    )
    return out.out if handed is None else (handed, out.out)
