"""W8A16: a matmul whose weight stays int8 with one float32 scale per output channel.

    qweight  int8 [N, K]        (nn.Linear's orientation)
    scales   float32 [N]
    y = (x @ q.T) * scales      x [M, K] float16 / bfloat16 / float32, y in x's dtype

int8 values are exact in float16 and bfloat16, so the kernel multiplies x by q converted to
x's dtype, accumulates in float32 and applies the channel scale once at the end. Decode-sized
M splits K across programs, as in kernels/quant_w4a16.py, and up to GEMV_MAX_ROWS rows run
`_channel_gemv_kernel` (broadcast multiply and a sum over K in registers, no tl.dot padding M to
16). That kernel takes any weight whose values widen exactly to float32: int8 here, FP8 e4m3
for kernels/quant_fp8.py's decode rows (masked weights load as 0.0, since Triton has no cast
from an integer constant to FP8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels import quant_split_k as split_k
from kernels.attention_tile import dot_precision
from kernels.quant_split_k import gemv_program, load_x, load_x_tile, store_row, store_tile


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


@triton.jit
def _load_channel_x(x_ptr, k0, k_end, offs_k, K, GATED: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) (zeros at or past k_end) of x's row (x_ptr points at it) as
    float32 (GATED: see quant_split_k.load_x)."""
    return load_x(x_ptr + k0 + offs_k, k0 + offs_k < k_end, K, GATED).to(tl.float32)


@triton.jit
def _load_channel_weights(w_ptr, k0, k_end, offs_k, n_ok, EVEN_N: tl.constexpr):
    """Columns [k0, k0 + BLOCK_K) (zeros at or past k_end) of the weight's rows (w_ptr
    [BLOCK_N, 1] points at their column 0) as loaded; `n_ok` masks the rows unless EVEN_N (N a
    multiple of BLOCK_N)."""
    k_ok = k0 + offs_k < k_end
    if EVEN_N:
        return tl.load(w_ptr + k0 + offs_k[None, :], mask=k_ok[None, :], other=0.0)
    return tl.load(w_ptr + k0 + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _load_channel_tile(x_ptr, w_ptr, k0, k_end, offs_k, n_ok, K, EVEN_N: tl.constexpr,
                       GATED: tl.constexpr):
    """One K tile's (x, weights): `_load_channel_x` and `_load_channel_weights`."""
    return (_load_channel_x(x_ptr, k0, k_end, offs_k, K, GATED),
            _load_channel_weights(w_ptr, k0, k_end, offs_k, n_ok, EVEN_N))


@triton.jit
def _channel_gemv_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, count_ptr,
    N, K, k_per_split,
    stride_xm, stride_wn, stride_os, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    EVEN_N: tl.constexpr, GATED: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """One row of x (program axis 0) times BLOCK_N rows of the [N, K] weight over split
    pid_k's columns of K; the weight tile is read along K, its contiguous axis.

    Each tile's products are summed over K at once into BLOCK_N float32 sums: few registers
    per thread, so more programs stay resident and more loads are in flight than with a
    [BLOCK_N, BLOCK_K] accumulator reduced after the loop (1.3x faster on an H200 at
    Llama-3-8B's shapes, 2026-11-28). Weights widen straight to float32 (exact for int8 and
    e4m3; through x's dtype cost FP8 a second conversion per weight). PREFETCH: the next
    tile's loads are issued before this tile's arithmetic (Triton pipelines only loads that
    feed tl.dot)."""
    row, pid_k, offs_n, n_ok, k_start, k_end = gemv_program(N, K, k_per_split, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w = _load_channel_weights(w_rows, k_start, k_end, offs_k, n_ok, EVEN_N)
    pdl.enter(PDL)  # after the first weight tile's loads: they never depend on the step
    x = _load_channel_x(x_row, k_start, k_end, offs_k, K, GATED)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            n_x, n_w = _load_channel_tile(x_row, w_rows, k0 + BLOCK_K, k_end, offs_k, n_ok,
                                          K, EVEN_N, GATED)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if PREFETCH:
            x, w = n_x, n_w
        else:
            x, w = _load_channel_tile(x_row, w_rows, k0 + BLOCK_K, k_end, offs_k, n_ok, K,
                                      EVEN_N, GATED)
    y = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    store_row(out_ptr, part_ptr, count_ptr, y, row, offs_n, N, stride_os, stride_om, SPLIT)


def channel_gemv(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, *,
    block_n: int, block_k: int, split: int, num_warps: int, num_stages: int,
    prefetch: bool = True, gated: bool = False,
) -> torch.Tensor:
    """(x @ weight.T) * scales for a few rows of x (weight [N, K] int8 or FP8, scales float32
    [N]), with an explicit launch configuration (the benchmark's --sweep times several);
    `gated`: x is [M, 2K] and the input silu(gate) * up (quant_split_k.load_x)."""
    m, (n, k) = x.shape[0], weight.shape
    out = split_k.split_output(m, n, k, block_k, split, x.dtype, x.device,
                               (m, triton.cdiv(n, block_n)))
    _channel_gemv_kernel[out.grid](
        x, weight, scales, out.out, out.parts, out.counts,
        n, k, out.k_per_split,
        x.stride(0), weight.stride(0), out.part_stride, n,
        BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=prefetch, EVEN_N=n % block_n == 0,
        GATED=gated, SPLIT=out.split, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch(x.device),
    )
    return out.out


CHANNEL_GEMV_TILE = {"block_n": 8, "block_k": 512}
"""Default tile of `_channel_gemv_kernel` (8 weight rows x 512 one-byte weights, next tile
prefetched): the best sum over Llama-3-8B's four projections at M = 1 on an H100
(kernels.bench.bench_quant_kernels --sweep, 2026-11-28 04:41 UTC: FP8 91.3 us vs 93.9 with
16 x 512 tiles and 112.3 for the earlier 16 x 256 form with a [16, 256] accumulator; on an
H200 int8 81.3 with 8 x 512 vs 87.0 with 16 x 512, FP8 79.0 vs 77.3)."""
CHANNEL_FEW_ROWS = {"block_n": 8, "block_k": 1024}
"""The channel form's tile where the weight has at most CHANNEL_FEW_ROWS_TILES row tiles (8
per SM of an H100): with few programs per SM, each keeps two 8 KB tiles in flight. FP8 at
M = 1 on an H200 (devrun sweep, two passes, 2026-11-28 10:47 UTC, us): o 6.5 vs 7.3 with
8 x 512 tiles, down 19.1 vs 21.6, q/k/v 10.8 vs 11.1; gate_up (3584 row tiles) keeps
8 x 512, 33.6 (1024: 40.2)."""
CHANNEL_FEW_ROWS_TILES = 1056


def channel_gemv_defaults(m: int, n: int) -> dict:
    """`_channel_gemv_kernel`'s launch for m rows of x and an [n, k] weight."""
    few = split_k.column_tiles(m, n, CHANNEL_GEMV_TILE["block_n"]) <= CHANNEL_FEW_ROWS_TILES
    return dict(CHANNEL_FEW_ROWS if few else CHANNEL_GEMV_TILE)


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
) -> torch.Tensor:
    """(x @ qweight.T) * scales, [M, N] in x's dtype (float32 accumulation); `gated`: x is
    [M, 2K] (an MLP's gate, then up) and the input is silu(gate) * up."""
    _check(x, qweight, scales, gated)
    return channel_matmul(x, qweight, scales, launch, gated)


def channel_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, launch: dict | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """(x @ weight.T) * scales for any [N, K] weight whose values widen exactly to float32 and
    to x's dtype (int8; FP8 e4m3 from kernels/quant_fp8.py). `launch` overrides the launch
    configuration (split_k.gemv_launch up to GEMV_MAX_ROWS rows, split_k.dot_launch above);
    `gated` as in `w8a16_matmul` (applied in the matrix-vector kernel's prologue)."""
    x, gated = split_k.gated_rows(x, gated)
    m, (n, k) = x.shape[0], weight.shape
    if 0 < m <= split_k.GEMV_MAX_ROWS:
        return channel_gemv(x, weight, scales,
                            **split_k.gemv_launch(m, n, k, channel_gemv_defaults(m, n), launch),
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
