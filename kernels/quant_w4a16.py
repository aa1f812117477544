"""W4A16: a matmul whose weight stays 4-bit, dequantized tile by tile inside the kernel.

The weight layout (GPTQ's, with groups made contiguous; workers/model/quant/ converts GPTQ and
AWQ checkpoints into it at load):

    qweight  int32 [K / 8, N]   input row 8i + j of column n in bits 4j..4j+3 of qweight[i, n]
    scales   [G, N]             float16 (as checkpoints store them)
    zeros    [G, N]             the integer zero point of each group, as the scales' dtype
    w[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]
    y = x @ w                   (x [M, K] float16 / bfloat16 / float32)

or, with `min_form` (GGUF Q4_1, whose offset is not an integer zero point), `zeros` holds
each group's minimum m and w[k, n] = q[k, n] * scales[g, n] + m[g, n].

G = ceil(K / group_size): the last group may be shorter (K = 576, group 128). The tl.dot
form dequantizes in float32 and rounds once to x's dtype (the tensor cores' operand), so
`dequantize_w4_ref(...).to(x.dtype)` is exactly the weight it multiplies by; the
matrix-vector form multiplies by the float32 weight unrounded (`w4a16_matmul_ref` follows).

Decode (M <= 16) is bandwidth-bound and has too few output tiles to fill the GPU, so K is
split across programs and the float32 partial sums are added by the last split of each tile
(kernels/quant_split_k.py `finish`). Up to
GEMV_MAX_ROWS rows run the matrix-vector form instead (kernels/quant_w4a16_gemv.py): no tl.dot,
which pads M to 16 and stages the dequantized tile through shared memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels import quant_split_k as split_k
from kernels.attention_tile import dot_precision
from kernels.norm_handoff import AddNorm, NormedRows, fuses_norm, input_rows
from kernels.quant_split_k import load_x_tile, store_tile
from kernels.quant_w4a16_gemv import gemv_defaults, gemv_supports, w4a16_gemv

NIBBLE_BIAS: tl.constexpr = tl.constexpr(2.0 ** 23)
NIBBLE_BIAS_BITS: tl.constexpr = tl.constexpr(0x4B000000)
"""2^23 as float32 and its bits."""
ROW_UNPACK = False
"""Default nibble unpacking of the tl.dot kernel (`_w4a16_kernel`'s ROW_UNPACK); the
benchmark's --sweep times both."""


@triton.jit
def _biased_nibbles(nibbles):
    """2^23 + q as float32 for int32 nibbles q in 0..15: q placed in the mantissa of 2^23,
    one logic op that merges with the mask, instead of an int -> float conversion (a
    quarter-rate instruction, one per weight)."""
    return (nibbles | NIBBLE_BIAS_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _dequantize_tile(q, s_ptr, z_ptr, k0, offs_n, N, K, group_size, stride_sg,
                     BLOCK_K: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
                     MIN_FORM: tl.constexpr):
    """The biased nibbles q = 2^23 + nibble [BLOCK_K, BLOCK_N] (`_biased_nibbles`) of rows
    [k0, k0 + BLOCK_K) dequantized with their groups' scales and zeros (or minimums), in
    float32: q - (2^23 + z) is nibble - z exactly. GROUP_PER_TILE: every K tile lies inside
    one group (group_size % BLOCK_K == 0), so one row of scales/zeros serves the whole tile;
    otherwise each row finds its own group."""
    n_ok = offs_n < N
    if GROUP_PER_TILE:
        g_off = (k0 // group_size) * stride_sg + offs_n
        s = tl.load(s_ptr + g_off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + g_off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        g_off = (offs_k // group_size)[:, None] * stride_sg + offs_n[None, :]
        g_mask = (offs_k < K)[:, None] & n_ok[None, :]
        s = tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
    if MIN_FORM:
        return (q - NIBBLE_BIAS) * s + z
    return (q - (z + NIBBLE_BIAS)) * s


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_qk, stride_sg, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_PER_TILE: tl.constexpr, MIN_FORM: tl.constexpr, PRECISION: tl.constexpr,
    ROW_UNPACK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """BLOCK_M rows of x times BLOCK_N columns over split pid_k's rows of K (tl.dot).
    ROW_UNPACK: each k's packed word loaded by offs_k // 8 (L1 serves the repeats), as the
    matrix-vector kernel does; otherwise [BLOCK_K / 8, BLOCK_N] words are loaded once and
    their nibbles reshaped to [BLOCK_K, BLOCK_N]."""
    pdl.enter(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, BLOCK_K)
        if ROW_UNPACK:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            packed = tl.load(
                qw_ptr + (offs_k // 8)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                mask=(offs_k < K)[:, None] & n_ok[None, :], other=0,
            )
            q = _biased_nibbles((packed >> ((offs_k % 8) * 4)[:, None]) & 0xF)
        else:
            offs_p = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            packed = tl.load(
                qw_ptr + offs_p[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                mask=(offs_p[:, None] < K // 8) & n_ok[None, :], other=0,
            )
            # [BLOCK_K / 8, 8, BLOCK_N] -> [BLOCK_K, BLOCK_N]: row 8i + j is nibble j of row i.
            q = tl.reshape(_biased_nibbles((packed[:, None, :] >> shifts) & 0xF),
                           (BLOCK_K, BLOCK_N))
        w = _dequantize_tile(q, s_ptr, z_ptr, k0, offs_n, N, K, group_size, stride_sg,
                             BLOCK_K, GROUP_PER_TILE, MIN_FORM).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    store_tile(out_ptr, part_ptr, count_ptr, acc, offs_m, offs_n, M, N, stride_os, stride_om,
               SPLIT)


def _check(x, qweight, scales, zeros, group_size, gated: bool) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"x {tuple(x.shape)} stride {x.stride()}"
    k = x.shape[1] // 2 if gated else x.shape[1]
    assert k % 8 == 0, f"K {k} is not a multiple of 8"
    assert group_size % 8 == 0, f"group size {group_size} is not a multiple of 8"
    assert qweight.dtype == torch.int32 and qweight.shape[0] == k // 8, (
        f"qweight {qweight.dtype} {tuple(qweight.shape)} vs K {k}")
    assert qweight.stride(1) == 1, f"qweight stride {qweight.stride()}"
    groups = -(-k // group_size)
    assert scales.shape == (groups, qweight.shape[1]), (
        f"scales {tuple(scales.shape)}, expected ({groups}, {qweight.shape[1]}) for K {k}, "
        f"group size {group_size}")
    assert zeros.shape == scales.shape and zeros.stride() == scales.stride(), (
        f"zeros {tuple(zeros.shape)} stride {zeros.stride()} vs scales {scales.stride()}")
    assert scales.stride(1) == 1, f"scales stride {scales.stride()}"


WIDE_TILE_WEIGHTS = 1 << 25
"""Weights (N K) from which 17..32 rows take 128-column tiles rather than split_k_config's 64."""


def dot_defaults(m: int, n: int, k: int) -> dict:
    """The tl.dot form's departures from `split_k.split_k_config`: for 17..32 rows, 128-column
    tiles on the large matrices (gate_up and down of Llama-3-8B at M = 32 on an H200, 19:47 UTC
    2026-11-28, `bench_quant_kernels --sweep --sweep-formats w4a16 --rows 32`: 93.5 -> 80.2 us
    and 46.3 -> 43.0 us); q/k/v and o (under 2^25 weights) stay at 64 (o 18.2 vs 20.6 us)."""
    if 16 < m <= 32 and n * k >= WIDE_TILE_WEIGHTS:
        return {"block_n": 128}
    return {}


def w4a16_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int32 [K / 8, N]
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor,  # [G, N]
    group_size: int,
    min_form: bool = False,
    launch: dict | None = None,
    gated: bool = False,
    add_norm: AddNorm | None = None,
) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
    """x @ dequantized weight, [M, N] in x's dtype (float32 accumulation). `launch` overrides
    the launch configuration (split_k.gemv_launch up to GEMV_MAX_ROWS rows, else
    split_k.dot_launch plus row_unpack), for the benchmark's --sweep. `gated`: x is
    [M, 2K] (an MLP's gate, then up) and the input is silu(gate) * up. A NormedRows x and
    `add_norm` (kernels/norm_handoff.py) only where `takes_norm(m, group_size)`."""
    if fuses_norm(x, add_norm):
        rows = input_rows(x)
        _check(rows, qweight, scales, zeros, group_size, gated)
        m, n, k = rows.shape[0], qweight.shape[1], qweight.shape[0] * 8
        assert takes_norm(m, group_size), f"{m} rows, group size {group_size}: no norm fusion"
        return w4a16_gemv(x, qweight, scales, zeros, group_size, min_form,
                          **split_k.gemv_launch(m, n, k, gemv_defaults(m, n, k, group_size),
                                                launch),
                          gated=gated, add_norm=add_norm)
    _check(x, qweight, scales, zeros, group_size, gated)
    x, gated = split_k.gated_rows(x, gated, gemv_supports(group_size))
    m, n, k = x.shape[0], qweight.shape[1], qweight.shape[0] * 8
    group_k = 128 if group_size % 128 == 0 else (64 if group_size % 64 == 0 else 32)
    if 0 < m <= split_k.GEMV_MAX_ROWS and gemv_supports(group_size):
        defaults = gemv_defaults(m, n, k, group_size)
        return w4a16_gemv(x, qweight, scales, zeros, group_size, min_form,
                          **split_k.gemv_launch(m, n, k, defaults, launch),
                          gated=gated)
    launch = {**dot_defaults(m, n, k), **(launch or {})}
    out, grid, meta = split_k.dot_plan(m, n, k, group_k, launch, x.dtype, x.device)
    row_unpack = meta.pop("row_unpack", ROW_UNPACK)
    if m > 0:
        _w4a16_kernel[grid](
            x, qweight, scales, zeros, out.out, out.parts, out.counts,
            m, n, k, group_size, out.k_per_split,
            x.stride(0), qweight.stride(0), scales.stride(0), out.part_stride, n,
            GROUP_PER_TILE=group_size % meta["BLOCK_K"] == 0, MIN_FORM=min_form,
            PRECISION=dot_precision(x.dtype), ROW_UNPACK=row_unpack, **meta,
            **pdl.launch(x.device),
        )
    return out.out


def takes_norm(m: int, group_size: int) -> bool:
    """Whether an m-row matmul runs the matrix-vector form, which takes NormedRows and
    AddNorm (kernels/norm_handoff.py)."""
    return 0 < m <= split_k.GEMV_MAX_ROWS and gemv_supports(group_size)


def unpack_rows_ref(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K / 8, N] -> int32 [K, N] of values 0..15 (row 8i + j from nibble j of row i)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nibbles = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF
    return nibbles.reshape(-1, qweight.shape[1])


def dequantize_w4_ref(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    min_form: bool = False,
) -> torch.Tensor:
    """The float32 weight [K, N] the layout describes."""
    q = unpack_rows_ref(qweight).float()
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    if min_form:
        return q * scales.float()[groups] + zeros.float()[groups]
    return (q - zeros.float()[groups]) * scales.float()[groups]


def w4a16_matmul_ref(x, qweight, scales, zeros, group_size, min_form=False):
    """Plain-torch reference of `w4a16_matmul`: the weight rounded to x's dtype above
    GEMV_MAX_ROWS rows (the tl.dot form's operand), kept in float32 up to it."""
    weight = dequantize_w4_ref(qweight, scales, zeros, group_size, min_form)
    if x.shape[0] > split_k.GEMV_MAX_ROWS:
        weight = weight.to(x.dtype)
    return (x.float() @ weight.float()).to(x.dtype)
