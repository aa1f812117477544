"""FP8 (e4m3) weights with one float32 scale per output channel, multiplied on the GPU's FP8
tensor cores (torch._scaled_mm, Hopper and newer).

    weight  float8_e4m3fn [N, K]   scales float32 [N]      W = weight * scales[:, None]

The tensor cores take both operands in FP8, so each row of x is quantized on the fly with its
own scale (amax / 448, "dynamic per-token"): y = (x_q @ weight.T) * x_scale * scales, in
bfloat16 (the row-wise scaled matmul writes bfloat16; a float16 model gets it converted).
`fp8_linear_ref` computes the same in float32 from the dequantized operands.

Up to WEIGHT_ONLY_ROWS rows (decode) the activations are not quantized: the weight is streamed
through kernels/quant_w8a16.py's kernels (e4m3 converts exactly to bfloat16 / float16), since a
batch-1 matmul is bound by reading the weight, not by the tensor cores, and the row-wise
scaled matmul plus the row quantization cost far more than the bandwidth at these sizes. There
y = (x @ weight.T) * scales in float32, rounded once to x's dtype.

The row quantization is one Triton kernel (`quantize_rows_fp8`; torch's five ops per call would
cost each linear of a decode step several launches), bit-equal to `quantize_rows_fp8_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.cache_write import quantize_fp8
from kernels.kv_quant import FP8_DTYPE as FP8
from kernels.kv_quant import FP8_MAX, divide
from kernels.norm_handoff import AddNorm, NormedRows, fuses_norm, input_rows
from kernels.quant_split_k import gated_rows
from kernels.quant_w8a16 import channel_matmul

MIN_SCALE = 1e-12
"""Floor of a row's scale, so an all-zero row does not divide by zero."""
ROW_BLOCK = 1024
WEIGHT_ONLY_ROWS = 64
"""Up to this many rows fp8_linear streams the FP8 weight against unquantized activations."""


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, min_scale,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row: its absolute maximum, scale = amax / 448 (IEEE division, floored), then the
    row over that scale rounded to e4m3."""
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), min_scale)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + offs, quantize_fp8(x, scale), mask=offs < K)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], float32 [M, 1] scales) with x ~ x_q * scale per row."""
    assert x.dim() == 2 and x.stride(1) == 1, f"x {tuple(x.shape)} stride {x.stride()}"
    m, k = x.shape
    x_q = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m > 0:
        _quantize_rows_kernel[(m,)](x, x_q, scale, k, x.stride(0), x_q.stride(0), MIN_SCALE,
                                    BLOCK=min(ROW_BLOCK, triton.next_power_of_2(k)),
                                    **pdl.launch(x.device))
    return x_q, scale


def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of `quantize_rows_fp8`."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = divide(amax, FP8_MAX).clamp(min=MIN_SCALE)
    x_q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_q, scale


def _check(x, weight, scales, gated: bool = False) -> None:
    assert x.dim() == 2, f"x {tuple(x.shape)}"
    k = x.shape[1] // 2 if gated else x.shape[1]
    assert weight.dtype == FP8 and weight.dim() == 2 and weight.shape[1] == k, (
        f"weight {weight.dtype} {tuple(weight.shape)} vs x {tuple(x.shape)}")
    assert weight.stride(1) == 1, f"weight stride {weight.stride()}"
    assert scales.dtype == torch.float32 and scales.shape == (weight.shape[0],), (
        f"scales {scales.dtype} {tuple(scales.shape)} vs N {weight.shape[0]}")
    assert k % 16 == 0 and weight.shape[0] % 16 == 0, (
        f"FP8 matmul needs K and N multiples of 16, got K {k}, N {weight.shape[0]}")


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
    weight_only_rows: int = WEIGHT_ONLY_ROWS, gated: bool = False,
    add_norm: AddNorm | None = None,
) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
    """x [M, K] @ (weight * scales).T, [M, N] in x's dtype: on the FP8 tensor cores above
    `weight_only_rows` rows, weight-only (activations unquantized) up to it. `gated`: x is
    [M, 2K] (an MLP's gate, then up) and the input is silu(gate) * up. A NormedRows x and
    `add_norm` (kernels/norm_handoff.py): weight-only, up to GEMV_MAX_ROWS rows."""
    if fuses_norm(x, add_norm):
        _check(input_rows(x), weight, scales, gated)
        return channel_matmul(x, weight, scales, gated=gated, add_norm=add_norm)
    x, gated = gated_rows(x, gated)
    _check(x, weight, scales, gated)
    if x.shape[0] <= weight_only_rows:
        return channel_matmul(x.contiguous(), weight, scales, gated=gated)
    x_q, x_scale = quantize_rows_fp8(x)
    out = torch._scaled_mm(
        x_q, weight.t(), scale_a=x_scale, scale_b=scales[None, :], out_dtype=torch.bfloat16
    )
    return out.to(x.dtype)


def fp8_linear_ref(x, weight, scales, weight_only_rows: int = WEIGHT_ONLY_ROWS):
    """Plain-torch reference of `fp8_linear`: up to `weight_only_rows` rows a float32 matmul of
    x and the dequantized weight; above, the same row quantization of x first, then a float32
    matmul of the dequantized operands."""
    if x.shape[0] <= weight_only_rows:
        return ((x.float() @ weight.to(x.dtype).float().T) * scales).to(x.dtype)
    x_q, x_scale = quantize_rows_fp8_ref(x)
    w = weight.float() * scales[:, None]
    return ((x_q.float() * x_scale) @ w.T).to(torch.bfloat16).to(x.dtype)
