"""KV cache write: scatter this step's new K/V rows into their cache slots.

Slot s of a cache `[num_blocks, block_size, num_kv_heads, head_dim]` is block s // block_size,
offset s % block_size. Negative slots mean "padding, write nothing" (CUDA-graph batches pad with
-1). An fp8 cache stores k / k_scale and v / v_scale rounded to e4m3 (kernels/kv_quant.py);
other caches take k and v as they are. Both are exact: the Triton kernel and the torch reference
agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.kv_quant import check_scales, is_fp8, put_rows, to_cache


@triton.jit
def quantize_fp8(x, scale):
    """x / scale (float32 tile, IEEE division) as float8e4nv, rounded to nearest even and
    saturated at +-448, bit-equal to kernels/kv_quant.py's `quantize_kv`.

    The rounding to 3 mantissa bits is done here in float32 (exact: a multiply by a power of
    two, then the 1.5 * 2^23 add-subtract that rounds to an integer under round-to-nearest-
    even), so the final cast is of an e4m3 value and cannot round: Triton 3.9's interpreter
    drops the carry when its cast rounds up into the next binade (127.9 -> 64)."""
    y = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)
    bits = y.to(tl.int32, bitcast=True)
    biased_exp = (bits >> 23) & 0xFF
    # Subnormals (|y| < 2^-6) share the spacing of the smallest normal binade, 2^-9.
    biased_exp = tl.maximum(biased_exp, 127 - 6)
    inv_ulp = ((257 - biased_exp) << 23).to(tl.float32, bitcast=True)  # 2^(3 - exp)
    ulp = ((biased_exp - 3) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 3)
    steps = (tl.abs(y) * inv_ulp + 12582912.0) - 12582912.0
    # The magnitude is rounded, then y's sign bit put back (so -0.001 gives -0, as in torch).
    rounded = (steps * ulp).to(tl.int32, bitcast=True) | (bits & -2147483648)
    return rounded.to(tl.float32, bitcast=True).to(tl.float8e4nv)


@triton.jit
def _cache_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    block_size, num_kv_heads, head_dim,
    BLOCK_HD: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    # One program copies all heads of one token: rows of K/V may be strided (views of qkv).
    idx = tl.arange(0, BLOCK_HD)
    mask = idx < num_kv_heads * head_dim
    head = idx // head_dim
    dim = idx % head_dim
    src_k = token.to(tl.int64) * stride_kt + head * stride_kh + dim
    src_v = token.to(tl.int64) * stride_vt + head * stride_vh + dim
    dst = block * stride_cb + offset * stride_cs + head * stride_ch + dim
    k = tl.load(k_ptr + src_k, mask=mask)
    v = tl.load(v_ptr + src_v, mask=mask)
    if FP8:
        k = quantize_fp8(k.to(tl.float32), tl.load(k_scale_ptr))
        v = quantize_fp8(v.to(tl.float32), tl.load(v_scale_ptr))
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def check_cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    assert k.dim() == 3 and k.shape == v.shape, f"k {tuple(k.shape)} v {tuple(v.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"k_cache {tuple(k_cache.shape)} v_cache {tuple(v_cache.shape)}")
    assert k.shape[1:] == k_cache.shape[2:], (
        f"k heads/dim {tuple(k.shape)} vs cache {tuple(k_cache.shape)}")
    assert k.dtype == v.dtype and k_cache.dtype == v_cache.dtype, (
        f"dtypes k {k.dtype} v {v.dtype} k_cache {k_cache.dtype} v_cache {v_cache.dtype}")
    assert is_fp8(k_cache.dtype) or k.dtype == k_cache.dtype, (
        f"dtypes k {k.dtype} vs cache {k_cache.dtype}")
    check_scales(k_cache, k_scale, v_scale)
    assert slot_mapping.shape == (k.shape[0],), f"slot_mapping {tuple(slot_mapping.shape)}"
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k.stride(1) == v.stride(1) and k_cache.stride() == v_cache.stride()


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = skip
    k_scale: torch.Tensor | None = None,  # [1] float32; needed by (only read for) fp8 caches
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write k[i], v[i] into slot slot_mapping[i] of k_cache, v_cache, in place (quantized
    with k_scale, v_scale when the caches are fp8)."""
    check_cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    fp8 = is_fp8(k_cache.dtype)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _cache_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1], num_kv_heads, head_dim,
        BLOCK_HD=triton.next_power_of_2(num_kv_heads * head_dim), FP8=fp8,
        **pdl.launch(k.device),
    )


def write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Plain-torch reference of `write_kv_cache`."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    put_rows(k_cache.view(-1, *k_cache.shape[2:]), slots, to_cache(k[keep], k_cache.dtype, k_scale))
    put_rows(v_cache.view(-1, *v_cache.shape[2:]), slots, to_cache(v[keep], v_cache.dtype, v_scale))
