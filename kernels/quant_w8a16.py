"""W8A16: a matmul whose weight stays int8 with one float32 scale per output channel.

    qweight  int8 [N, K]        (nn.Linear's orientation)
    scales   float32 [N]
    y = (x @ q.T) * scales      x [M, K] float16 / bfloat16 / float32, y in x's dtype

int8 values are exact in float16 and bfloat16, so the tl.dot kernel multiplies x by q
converted to x's dtype, accumulates in float32 and applies the channel scale once at the end.
Decode-sized M splits K across programs, as in kernels/quant_w4a16.py. Up to GEMV_MAX_ROWS rows
run `_channel_gemv_kernel` (broadcast multiply-adds in registers, no tl.dot padding M to 16),
for int8 here and FP8 e4m3 for kernels/quant_fp8.py's decode rows: it reads the weight as int32
words and places each byte in a float32 bit pattern with integer ops (`_widen_words`) rather
than converting it (the converting form's loop ran ~7 SASS instructions per weight for FP8;
this one 5.5, int8 4.4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels import quant_split_k as split_k
from kernels.attention_tile import dot_precision
from kernels.norm_handoff import (
    AddNorm,
    NormedRows,
    fuses_norm,
    input_rows,
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
    X_SCALE8,
    X_SCALE16,
    gemv_program,
    load_x,
    load_x_tile,
    store_row,
    store_tile,
)


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(
            w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
            mask=(offs_k[:, None] < K) & n_ok[None, :], other=0.0,
        )
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * s[None, :]
    store_tile(out_ptr, part_ptr, count_ptr, acc, offs_m, offs_n, M, N, stride_os, stride_om,
               SPLIT)


FP8_BITS: tl.constexpr = tl.constexpr(0x87F00000 - (1 << 32))
"""Sign bit and bits 20..26 of an int32: where an e4m3 byte shifted to bits 24..31 and then
arithmetically right by 4 has its sign and its exponent and mantissa bits."""
INT8_FLIP: tl.constexpr = tl.constexpr(0x80808080 - (1 << 32))
"""XOR of each byte's top bit: int8 q becomes the unsigned byte q + 128."""
FP8_PRODUCT_SCALE: tl.constexpr = tl.constexpr(2.0 ** (120 - split_k.X_EXP))
"""What turns a sum of x 2^X_EXP times e4m3 weights widened to w 2^-120 back into sum x w:
float32 precision for products |x w| from 2^(-6 - X_EXP) (2e-31); int8's bytes are denormals
and take quant_split_k's X_EXP scales as they are (products from 1e-22)."""


@triton.jit
def _widen_words(acc, words, x0, x1, x2, x3, FP8_WEIGHTS: tl.constexpr):
    """acc + sum_j x_j w_j over the four one-byte weights of each int32 word ([BLOCK_N, W]; byte j
    is the weight of input row 4i + j, x_j [W]) times `_product_scale(FP8_WEIGHTS)`, in
    float32, without converting a byte: each is placed in a float32 bit pattern by integer
    ops. e4m3: the byte shifted to bits 24..31 and arithmetically right by 4 has its sign at
    bit 31 and its exponent and mantissa at bits 20..26 (`FP8_BITS`): the float32 w 2^-120
    exactly, subnormals included. int8: with each top bit flipped (`INT8_FLIP`: q + 128 >= 0),
    bytes 0..2 masked in place and byte 3 shifted to bits 16..23 are the float32s
    (q + 128) 2^(8j - 149) and (q + 128) 2^-133 exactly (denormals, or the smallest normals
    where bit 23 is set); the caller subtracts 128 sum x. Not for e4m3's NaN bytes, which widen
    to finite numbers (quantized weights never hold them)."""
    if FP8_WEIGHTS:
        f0 = (((words << 24) >> 4) & FP8_BITS).to(tl.float32, bitcast=True)
        f1 = (((words << 16) >> 4) & FP8_BITS).to(tl.float32, bitcast=True)
        f2 = (((words << 8) >> 4) & FP8_BITS).to(tl.float32, bitcast=True)
        f3 = ((words >> 4) & FP8_BITS).to(tl.float32, bitcast=True)
        acc += (x0 * X_SCALE0)[None, :] * f0
        acc += (x1 * X_SCALE0)[None, :] * f1
        acc += (x2 * X_SCALE0)[None, :] * f2
        return acc + (x3 * X_SCALE0)[None, :] * f3
    u = words ^ INT8_FLIP
    f0 = (u & 0xFF).to(tl.float32, bitcast=True)
    f1 = (u & 0xFF00).to(tl.float32, bitcast=True)
    f2 = (u & 0xFF0000).to(tl.float32, bitcast=True)
    f3 = ((u >> 8) & 0xFF0000).to(tl.float32, bitcast=True)
    acc += (x0 * X_SCALE0)[None, :] * f0
    acc += (x1 * X_SCALE8)[None, :] * f1
    acc += (x2 * X_SCALE16)[None, :] * f2
    return acc + (x3 * X_SCALE16)[None, :] * f3


@triton.jit
def _product_scale(FP8_WEIGHTS: tl.constexpr):
    """What turns a sum of `_widen_words` back into sum x w (int8: sum x (q + 128))."""
    if FP8_WEIGHTS:
        return FP8_PRODUCT_SCALE
    return PRODUCT_SCALE


@triton.jit
def _load_channel_x(x_ptr, k0, k_end, offs_w, K, GATED: tl.constexpr):
    """x's inputs 4i + j of K tile [k0, k0 + BLOCK_K) (zeros at or past k_end; x_ptr points
    at x's row) as four [BLOCK_K / 4] float32 columns j = 0..3, from one [BLOCK_K / 4, 4]
    load (GATED: see quant_split_k.load_x)."""
    offs = k0 + offs_w[:, None] * 4 + tl.arange(0, 4)[None, :]
    x = load_x(x_ptr + offs, offs < k_end, K, GATED).to(tl.float32)
    # [W, 4] -> [W, a, b] with j = 2a + b; each split takes the last axis.
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _load_channel_words(w_ptr, k0, k_end, offs_w, n_ok, EVEN_N: tl.constexpr):
    """Words [k0 / 4, k0 / 4 + BLOCK_K / 4) (zeros at or past k_end) of the weight's rows
    (w_ptr [BLOCK_N, 1] points at their word 0), four one-byte weights each; `n_ok` masks the
    rows unless EVEN_N (N a multiple of BLOCK_N)."""
    k_ok = k0 + offs_w * 4 < k_end
    if EVEN_N:
        return tl.load(w_ptr + k0 // 4 + offs_w[None, :], mask=k_ok[None, :], other=0)
    return tl.load(w_ptr + k0 // 4 + offs_w[None, :], mask=n_ok[:, None] & k_ok[None, :],
                   other=0)


@triton.jit
def _channel_gemv_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, count_ptr,
    N, K, k_per_split,
    stride_xm, stride_wn, stride_os, stride_om,
    sq_in_ptr, stride_sq_in, n_parts, eps,
    res_ptr, stride_res, scaled_ptr, norm_w_ptr, sq_out_ptr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    EVEN_N: tl.constexpr, FP8_WEIGHTS: tl.constexpr, GATED: tl.constexpr,
    SPLIT: tl.constexpr, NORMED: tl.constexpr, PARTS: tl.constexpr, ADD_NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    """One row of x (program axis 0) times BLOCK_N rows of the [N, K] weight over split
    pid_k's columns of K; the weight is read as int32 words along K, its contiguous axis
    (`stride_wn` in words), and widened by `_widen_words`.

    The float32 sums of each word's four products accumulate in a [BLOCK_N, BLOCK_K / 4]
    tile (a multiply-add per weight), summed over K once after the loop. PREFETCH: the next
    tile's loads are issued before this tile's arithmetic (Triton pipelines only loads that
    feed tl.dot). NORMED / ADD_NORM: a NormedRows input, AddNorm's epilogue
    (kernels/norm_handoff.py)."""
    row, pid_k, offs_n, n_ok, k_start, k_end = gemv_program(N, K, k_per_split, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 4)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_K // 4,), dtype=tl.float32)
    w = _load_channel_words(w_rows, k_start, k_end, offs_w, n_ok, EVEN_N)
    norm_w = norm_weight(norm_w_ptr, offs_n, N, ADD_NORM)
    pdl.enter(PDL)  # after the first weight tile's loads: they never depend on the step
    parts = square_parts(sq_in_ptr, row, stride_sq_in, n_parts, NORMED, PARTS)
    residual = residual_row(res_ptr, row, stride_res, offs_n, N, ADD_NORM)
    x0, x1, x2, x3 = _load_channel_x(x_row, k_start, k_end, offs_w, K, GATED)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            n_w = _load_channel_words(w_rows, k0 + BLOCK_K, k_end, offs_w, n_ok, EVEN_N)
            n_x0, n_x1, n_x2, n_x3 = _load_channel_x(x_row, k0 + BLOCK_K, k_end, offs_w, K,
                                                     GATED)
        acc = _widen_words(acc, w, x0, x1, x2, x3, FP8_WEIGHTS)
        if not FP8_WEIGHTS:
            x_sum += (x0 + x1) + (x2 + x3)
        if PREFETCH:
            w, x0, x1, x2, x3 = n_w, n_x0, n_x1, n_x2, n_x3
        else:
            w = _load_channel_words(w_rows, k0 + BLOCK_K, k_end, offs_w, n_ok, EVEN_N)
            x0, x1, x2, x3 = _load_channel_x(x_row, k0 + BLOCK_K, k_end, offs_w, K, GATED)
    y = tl.sum(acc, axis=1) * _product_scale(FP8_WEIGHTS)
    if not FP8_WEIGHTS:  # sum x q = sum x (q + 128) - 128 sum x
        y -= 128.0 * tl.sum(x_sum, axis=0)
    y *= tl.load(s_ptr + offs_n, mask=n_ok, other=0.0) * rstd(parts, K, eps, NORMED)
    if ADD_NORM:
        store_row_add_norm(out_ptr, y, row, offs_n, N, stride_om, residual, norm_w,
                           scaled_ptr, sq_out_ptr)
    else:
        store_row(out_ptr, part_ptr, count_ptr, y, row, offs_n, N, stride_os, stride_om, SPLIT)


def channel_gemv(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, *,
    block_n: int, block_k: int, split: int, num_warps: int, num_stages: int,
    prefetch: bool = True, gated: bool = False, add_norm: AddNorm | None = None,
) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
    """(x @ weight.T) * scales for a few rows of x (weight [N, K] int8 or FP8, K a multiple of
    4, scales float32 [N]), with an explicit launch configuration (the benchmark's --sweep
    times several); `gated`: x is [M, 2K] and the input silu(gate) * up
    (quant_split_k.load_x). x may be NormedRows; with `add_norm` it returns (NormedRows for
    the next matmul, the new residual) (kernels/norm_handoff.py)."""
    m, (n, k) = x.shape[0], weight.shape
    assert k % 4 == 0 and weight.stride(0) % 4 == 0, (
        f"the matrix-vector form reads weight {tuple(weight.shape)} stride {weight.stride()} "
        "as int32 words: K and the row stride must be multiples of 4")
    out = split_k.split_output(m, n, k, block_k, split, x.dtype, weight.device,
                               (m, triton.cdiv(n, block_n)))
    x, norm_args, handed = norm_launch(x, add_norm, out, n)
    _channel_gemv_kernel[out.grid](
        x, weight.view(torch.int32), scales, out.out, out.parts, out.counts,
        n, k, out.k_per_split,
        x.stride(0), weight.stride(0) // 4, out.part_stride, n,
        BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=prefetch, EVEN_N=n % block_n == 0,
        FP8_WEIGHTS=weight.dtype != torch.int8, GATED=gated, SPLIT=out.split,
        num_warps=num_warps, num_stages=num_stages, **norm_args, **pdl.launch(x.device),
    )
    return out.out if handed is None else (handed, out.out)


CHANNEL_GEMV_TILE = {"block_n": 16, "block_k": 512, "split": 1}
"""Default tile of `_channel_gemv_kernel` (16 weight rows x 512 one-byte weights, next tile
prefetched, K not split: every split measured slower). Best per projection of Llama-3-8B at
M = 1 on an H200 (devrun A/B against the byte-widening form, graphs of 50 calls, 2026-11-28
13:29 UTC, us, FP8 / int8): o 5.34 / 5.37 (byte form 6.01 / 6.83), gate_up 32.3 / 32.5
(33.9 / 36.9)."""
CHANNEL_MID_ROWS = {"block_n": 16, "block_k": 1024, "split": 1}
"""The tile where the 16-row tiles number more than split_k.TARGET_PROGRAMS and at most
CHANNEL_MID_ROWS_TILES: q/k/v 7.67 / 6.89 us vs 10.8 / 9.5 with 512-byte K tiles (byte form
8.61 / 9.50)."""
CHANNEL_MID_ROWS_TILES = 1056
CHANNEL_LONG_K = 4096
"""Above this K (down, K 14336): 8-row tiles of 1024 bytes on 8 warps, 18.1 / 17.4 us (16 x 512:
22.6 / 22.8; byte form 19.6 / 21.8)."""


def channel_gemv_defaults(m: int, n: int, k: int) -> dict:
    """`_channel_gemv_kernel`'s launch for m rows of x and an [n, k] weight."""
    if k > CHANNEL_LONG_K:
        return {"block_n": 8, "block_k": 1024, "num_warps": 8, "split": 1}
    tiles = split_k.column_tiles(m, n, CHANNEL_GEMV_TILE["block_n"])
    mid = split_k.TARGET_PROGRAMS < tiles <= CHANNEL_MID_ROWS_TILES
    return dict(CHANNEL_MID_ROWS if mid else CHANNEL_GEMV_TILE)


def _check(x, qweight, scales, gated: bool) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"x {tuple(x.shape)} stride {x.stride()}"
    assert qweight.dtype == torch.int8 and qweight.dim() == 2, f"qweight {qweight.dtype}"
    k = x.shape[1] // 2 if gated else x.shape[1]
    assert qweight.shape[1] == k and qweight.stride(1) == 1, (
        f"qweight {tuple(qweight.shape)} stride {qweight.stride()} vs x {tuple(x.shape)}")
    assert scales.dtype == torch.float32 and scales.shape == (qweight.shape[0],), (
        f"scales {scales.dtype} {tuple(scales.shape)} vs N {qweight.shape[0]}")


def w8a16_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int8 [N, K]
    scales: torch.Tensor,  # float32 [N]
    launch: dict | None = None,
    gated: bool = False,
    add_norm: AddNorm | None = None,
) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
    """(x @ qweight.T) * scales, [M, N] in x's dtype (float32 accumulation); `gated`: x is
    [M, 2K] (an MLP's gate, then up) and the input is silu(gate) * up; NormedRows and
    `add_norm` as in `channel_matmul`."""
    _check(input_rows(x), qweight, scales, gated)
    return channel_matmul(x, qweight, scales, launch, gated, add_norm)


def channel_matmul(
    x: torch.Tensor | NormedRows, weight: torch.Tensor, scales: torch.Tensor,
    launch: dict | None = None, gated: bool = False, add_norm: AddNorm | None = None,
) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
    """(x @ weight.T) * scales for any [N, K] weight whose values widen exactly to float32 and
    to x's dtype (int8; FP8 e4m3 from kernels/quant_fp8.py). `launch` overrides the launch
    configuration (split_k.gemv_launch up to GEMV_MAX_ROWS rows, split_k.dot_launch above);
    `gated` as in `w8a16_matmul` (applied in the matrix-vector kernel's prologue). A
    NormedRows x and `add_norm` (kernels/norm_handoff.py) only up to GEMV_MAX_ROWS rows."""
    if fuses_norm(x, add_norm):
        m, (n, k) = x.shape[0], weight.shape
        assert 0 < m <= split_k.GEMV_MAX_ROWS and not gated, (
            f"{m} rows{' gated' if gated else ''}: no norm fusion")
        return channel_gemv(x, weight, scales,
                            **split_k.gemv_launch(m, n, k, channel_gemv_defaults(m, n, k), launch),
                            add_norm=add_norm)
    x, gated = split_k.gated_rows(x, gated)
    m, (n, k) = x.shape[0], weight.shape
    if 0 < m <= split_k.GEMV_MAX_ROWS:
        return channel_gemv(x, weight, scales,
                            **split_k.gemv_launch(m, n, k, channel_gemv_defaults(m, n, k), launch),
                            gated=gated)
    out, grid, meta = split_k.dot_plan(m, n, k, 128, launch, x.dtype, x.device)
    if m > 0:
        _w8a16_kernel[grid](
            x, weight, scales, out.out, out.parts, out.counts,
            m, n, k, out.k_per_split,
            x.stride(0), weight.stride(0), out.part_stride, n,
            PRECISION=dot_precision(x.dtype), **meta, **pdl.launch(x.device),
        )
    return out.out


def w8a16_matmul_ref(x, qweight, scales):
    """Plain-torch reference of `w8a16_matmul`."""
    return ((x.float() @ qweight.to(x.dtype).float().T) * scales).to(x.dtype)
