"""RoPE and KV cache write in one launch: per token, rotate q in place and write the rotated
k and v into the token's cache slot.

Bit for bit what `kernels.rotary.apply_rotary` then `kernels.cache_write.write_kv_cache` give
(the same `rotate_halves` float32 math rounded to k's dtype, then the same cache rounding:
`quantize_fp8` for fp8 caches), one kernel instead of two. k itself is left unrotated: on
this path nothing reads k after the cache write (attention reads K from the cache). Slot < 0
(padding): q is still rotated, nothing is written. Partial rotary (rotary_dim < head_dim):
the dims past rotary_dim are written unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.cache_write import check_cache_write, quantize_fp8
from kernels.kv_quant import is_fp8
from kernels.rotary import check_rotary, load_cos_sin, rotate_halves, rotate_heads


@triton.jit
def _to_cache(x, scale_ptr, cache_ptr, FP8: tl.constexpr):
    """x in the cache's element type (quantized with the scale when the cache is fp8)."""
    if FP8:
        y = quantize_fp8(x.to(tl.float32), tl.load(scale_ptr))
    else:
        y = x.to(cache_ptr.dtype.element_ty)
    return y


@triton.jit
def _rotary_cache_write_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, cos_ptr, sin_ptr,
    k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_cb, stride_cs, stride_ch,
    block_size, num_heads, num_kv_heads, head_dim, half,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_HD: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = load_cos_sin(pos_ptr, token, cos_ptr, sin_ptr, stride_cos, half, BLOCK_R)
    rotate_heads(q_ptr, token, stride_qt, stride_qh, num_heads, cos, sin, half, BLOCK_H, BLOCK_R)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
    # k: rotated halves, then the pass-through dims [2 * half, head_dim).
    heads = tl.arange(0, BLOCK_KH)[:, None]
    dims = tl.arange(0, BLOCK_R)[None, :]
    mask = (heads < num_kv_heads) & (dims < half)
    src = k_ptr + token * stride_kt + heads * stride_kh + dims
    k1, k2 = rotate_halves(tl.load(src, mask=mask, other=0.0),
                           tl.load(src + half, mask=mask, other=0.0), cos, sin)
    out = k_cache_ptr + dst + heads * stride_ch + dims
    tl.store(out, _to_cache(k1, k_scale_ptr, k_cache_ptr, FP8), mask=mask)
    tl.store(out + half, _to_cache(k2, k_scale_ptr, k_cache_ptr, FP8),
             mask=mask)
    rest = 2 * half + tl.arange(0, BLOCK_P)[None, :]
    mask = (heads < num_kv_heads) & (rest < head_dim)
    kp = tl.load(k_ptr + token * stride_kt + heads * stride_kh + rest, mask=mask)
    tl.store(k_cache_ptr + dst + heads * stride_ch + rest,
             _to_cache(kp, k_scale_ptr, k_cache_ptr, FP8), mask=mask)
    # v: as kernels/cache_write.py, all heads of the token in one tile.
    idx = tl.arange(0, BLOCK_HD)
    mask = idx < num_kv_heads * head_dim
    head = idx // head_dim
    dim = idx % head_dim
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + dim, mask=mask)
    tl.store(v_cache_ptr + dst + head * stride_ch + dim,
             _to_cache(v, v_scale_ptr, v_cache_ptr, FP8), mask=mask)


def rotary_cache_write(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], unrotated; left as it is
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 = rotate q only
    positions: torch.Tensor,  # [num_tokens] int
    cos: torch.Tensor,  # [max_position, rotary_dim // 2]
    sin: torch.Tensor,
    k_scale: torch.Tensor | None = None,  # [1] float32; read for fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    """`apply_rotary(q, k, ...)` then `write_kv_cache(k, v, ...)` in one launch (module doc);
    k, v in the cache's dtype unless the cache is fp8."""
    check_rotary(q, k, positions, cos, sin)
    check_cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    fp8 = is_fp8(k_cache.dtype)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    half = cos.shape[1]
    _rotary_cache_write_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin,
        k_scale if fp8 else cos, v_scale if fp8 else cos,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1], q.shape[1], num_kv_heads, head_dim, half,
        BLOCK_H=triton.next_power_of_2(q.shape[1]),
        BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_R=triton.next_power_of_2(half),
        BLOCK_P=triton.next_power_of_2(max(1, head_dim - 2 * half)),
        BLOCK_HD=triton.next_power_of_2(num_kv_heads * head_dim), FP8=fp8,
        **pdl.launch(q.device),
    )
