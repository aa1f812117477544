"""W8A16: a matmul whose weight stays int8 with one float32 scale per output channel.

    qweight  int8 [N, K]        (nn.Linear's orientation)
    scales   float32 [N]
    y = (x @ q.T) * scales      x [M, K] float16 / bfloat16 / float32, y in x's dtype

int8 values are exact in float16 and bfloat16, so the kernel multiplies x by q converted to
x's dtype, accumulates in float32 and applies the channel scale once at the end. Decode-sized
M splits K across programs, as in kernels/quant_w4a16.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import quant_split_k as split_k
from kernels.attention_tile import dot_precision
from kernels.quant_split_k import load_x_tile, store_tile


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
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
            mask=(offs_k[:, None] < K) & n_ok[None, :], other=0,
        )
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * s[None, :]
    store_tile(out_ptr, acc, pid_k, offs_m, offs_n, M, N, stride_os, stride_om)


def _check(x, qweight, scales) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"x {tuple(x.shape)} stride {x.stride()}"
    assert qweight.dtype == torch.int8 and qweight.dim() == 2, f"qweight {qweight.dtype}"
    assert qweight.shape[1] == x.shape[1] and qweight.stride(1) == 1, (
        f"qweight {tuple(qweight.shape)} stride {qweight.stride()} vs x {tuple(x.shape)}")
    assert scales.dtype == torch.float32 and scales.shape == (qweight.shape[0],), (
        f"scales {scales.dtype} {tuple(scales.shape)} vs N {qweight.shape[0]}")


def w8a16_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int8 [N, K]
    scales: torch.Tensor,  # float32 [N]
) -> torch.Tensor:
    """(x @ qweight.T) * scales, [M, N] in x's dtype (float32 accumulation)."""
    _check(x, qweight, scales)
    (m, k), n = x.shape, qweight.shape[0]
    block_m, block_n, block_k, split = split_k.split_k_config(m, n, k, 128)
    out, k_per_split, splits = split_k.split_output(m, n, k, block_k, split, x.dtype, x.device)
    if m > 0:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
        _w8a16_kernel[grid](
            x, qweight, scales, out,
            m, n, k, k_per_split,
            x.stride(0), qweight.stride(0), out.stride(0) if splits > 1 else 0, out.stride(-2),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION=dot_precision(x.dtype),
        )
    return split_k.reduce_splits(out, x.dtype)


def w8a16_matmul_ref(x, qweight, scales):
    """Plain-torch reference of `w8a16_matmul`."""
    return ((x.float() @ qweight.to(x.dtype).float().T) * scales).to(x.dtype)
