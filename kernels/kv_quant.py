"""The FP8 KV cache format (`--kv-cache-dtype fp8`, vLLM's convention): e4m3, one float32
scale per layer for K and one for V.

A cache element stores `x / scale` rounded to nearest-even e4m3, saturated at +-448; it reads
back as `stored * scale`. Scales are 1-element float32 device tensors (read inside the kernels,
so a CUDA graph replays with whatever value they hold, and a scale is never a host sync).
Attention kernels fold the K scale into the softmax scale and the V scale into the output, so
the tile loop only widens fp8 to the query's dtype (exact: every e4m3 value is a bf16/fp16
value).

Here: the torch quantize / dequantize every reference and the torch backend use (torch only,
so the torch backend never imports Triton); the cache-write kernel's rounding, bit-equal to
`quantize_kv`, is `quantize_fp8` in kernels/cache_write.py.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite e4m3fn magnitude; values beyond saturate to it."""


def divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor as the IEEE quotient on every device: CUDA divides a tensor by a Python
    scalar as a multiply by the scalar's reciprocal (off by an ulp at times), so scales computed
    on a GPU would differ from the same scales computed on the CPU and from the kernels' div_rn.
    """
    return x / torch.full_like(x, divisor)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` as e4m3 (round to nearest even, saturating): what a cache slot stores."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Float32 values of cache rows: `stored * scale` for fp8, a plain widening otherwise."""
    return stored.float() * scale if is_fp8(stored.dtype) else stored.float()


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None):
    """New K or V rows in the cache's dtype (quantized when the cache is fp8)."""
    return quantize_kv(x, scale) if is_fp8(cache_dtype) else x.to(cache_dtype)


def index_view(t: torch.Tensor) -> torch.Tensor:
    """`t` as uint8 (same shape) if its elements are single bytes: torch's index kernels
    (index_copy_ on CPU, others on some builds) lack float8, and moving bytes is the same."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def take_rows(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`cache[index]` (rows of axis 0) in the cache's dtype, fp8 included."""
    return index_view(cache)[index].view(cache.dtype)


def put_rows(cache: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """`cache[index] = rows` in place; rows already in the cache's dtype."""
    index_view(cache)[index] = index_view(rows)


def check_scales(cache: torch.Tensor, k_scale, v_scale) -> None:
    """An fp8 cache needs both scales: 1-element float32 tensors on its device."""
    if not is_fp8(cache.dtype):
        return
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        assert scale is not None, f"an {cache.dtype} cache needs {name}"
        assert scale.numel() == 1 and scale.dtype == torch.float32, (
            f"{name}: {scale.numel()} x {scale.dtype}, want 1 x float32")
        assert scale.device == cache.device, f"{name} on {scale.device}, cache on {cache.device}"
