"""FP8 (e4m3) weights with one float32 scale per output channel, multiplied on the GPU's FP8
tensor cores (torch._scaled_mm, Hopper and newer).

    weight  float8_e4m3fn [N, K]   scales float32 [N]      W = weight * scales[:, None]

The tensor cores take both operands in FP8, so each row of x is quantized on the fly with its
own scale (amax / 448, "dynamic per-token"): y = (x_q @ weight.T) * x_scale * scales, in
bfloat16 (the row-wise scaled matmul writes bfloat16; a float16 model gets it converted).
`fp8_linear_ref` computes the same in float32 from the dequantized operands.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12
"""Floor of a row's scale, so an all-zero row does not divide by zero."""


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], float32 [M, 1] scales) with x ~ x_q * scale per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    x_q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_q, scale


def _check(x, weight, scales) -> None:
    assert x.dim() == 2, f"x {tuple(x.shape)}"
    assert weight.dtype == FP8 and weight.dim() == 2 and weight.shape[1] == x.shape[1], (
        f"weight {weight.dtype} {tuple(weight.shape)} vs x {tuple(x.shape)}")
    assert weight.stride(1) == 1, f"weight stride {weight.stride()}"
    assert scales.dtype == torch.float32 and scales.shape == (weight.shape[0],), (
        f"scales {scales.dtype} {tuple(scales.shape)} vs N {weight.shape[0]}")
    assert x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0, (
        f"FP8 matmul needs K and N multiples of 16, got K {x.shape[1]}, N {weight.shape[0]}")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (weight * scales).T on the FP8 tensor cores, [M, N] in x's dtype."""
    _check(x, weight, scales)
    x_q, x_scale = quantize_rows_fp8(x)
    out = torch._scaled_mm(
        x_q, weight.t(), scale_a=x_scale, scale_b=scales[None, :], out_dtype=torch.bfloat16
    )
    return out.to(x.dtype)


def fp8_linear_ref(x, weight, scales):
    """Plain-torch reference of `fp8_linear`: the same row quantization of x, then a float32
    matmul of the dequantized operands."""
    x_q, x_scale = quantize_rows_fp8(x)
    w = weight.float() * scales[:, None]
    return ((x_q.float() * x_scale) @ w.T).to(torch.bfloat16).to(x.dtype)
