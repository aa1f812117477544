"""Rotary position embedding (rotate-half / NeoX layout, as Hugging Face Llama), in place.

The caller passes cos/sin caches `[max_position, rotary_dim / 2]`, so any frequency scaling
(Llama-3, linear, NTK, YaRN) is decided where the cache is built, not here. The first
`rotary_dim` features of each head rotate; the rest pass through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def rotate_heads(x_ptr, token, stride_t, stride_h, num_heads, cos, sin, half,
                 BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rotates the first 2 * half dims of `num_heads` heads of one token in place
    (kernels/rotary_cache_write.py rotates q with it too)."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_R)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < half)
    ptr1 = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1, x2 = rotate_halves(tl.load(ptr1, mask=mask, other=0.0),
                           tl.load(ptr1 + half, mask=mask, other=0.0), cos, sin)
    tl.store(ptr1, x1, mask=mask)
    tl.store(ptr1 + half, x2, mask=mask)


@triton.jit
def rotate_halves(x1, x2, cos, sin):
    """The rotated halves (float32 math, rounded to x1's dtype); kernels/rotary_cache_write.py
    shares it so both paths round identically."""
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype)


@triton.jit
def load_cos_sin(pos_ptr, token, cos_ptr, sin_ptr, stride_cos, half, BLOCK_R: tl.constexpr):
    """This token's cos, sin rows as float32 [1, BLOCK_R] (zero past `half`)."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_R)
    cos = tl.load(cos_ptr + pos * stride_cos + dims, mask=dims < half, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + dims, mask=dims < half, other=0.0)
    return cos.to(tl.float32)[None, :], sin.to(tl.float32)[None, :]


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    num_heads, num_kv_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = load_cos_sin(pos_ptr, token, cos_ptr, sin_ptr, stride_cos, half, BLOCK_R)
    rotate_heads(q_ptr, token, stride_qt, stride_qh, num_heads, cos, sin, half, BLOCK_H, BLOCK_R)
    rotate_heads(k_ptr, token, stride_kt, stride_kh, num_kv_heads, cos, sin, half,
                 BLOCK_KH, BLOCK_R)


def check_rotary(q, k, positions, cos, sin) -> None:
    assert q.dim() == 3 and k.dim() == 3, f"q {tuple(q.shape)} k {tuple(k.shape)}: want [T, H, D]"
    assert q.shape[0] == k.shape[0] == positions.shape[0], "q, k, positions disagree on tokens"
    assert q.shape[2] == k.shape[2] and q.stride(2) == 1 and k.stride(2) == 1
    assert cos.shape == sin.shape and cos.dim() == 2, f"cos {tuple(cos.shape)} sin {sin.shape}"
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    assert 2 * cos.shape[1] <= q.shape[2], f"rotary dim {2 * cos.shape[1]} > head dim {q.shape[2]}"


def apply_rotary(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    positions: torch.Tensor,  # [num_tokens] int
    cos: torch.Tensor,  # [max_position, rotary_dim // 2]
    sin: torch.Tensor,
) -> None:
    """Rotate q and k in place by their tokens' positions."""
    check_rotary(q, k, positions, cos, sin)
    if q.shape[0] == 0:
        return
    half = cos.shape[1]
    _rotary_kernel[(q.shape[0],)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        q.shape[1], k.shape[1], half,
        BLOCK_H=triton.next_power_of_2(q.shape[1]),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_R=triton.next_power_of_2(half), **pdl.launch(q.device),
    )


def apply_rotary_ref(q, k, positions, cos, sin) -> None:
    """Plain-torch reference of `apply_rotary` (float32 math, in place)."""
    half = cos.shape[1]
    c = cos[positions.long()].float()[:, None, :]
    s = sin[positions.long()].float()[:, None, :]
    for x in (q, k):
        a = x[..., :half].float()
        b = x[..., half:2 * half].float()
        rotated = ((a * c - b * s).to(x.dtype), (b * c + a * s).to(x.dtype))
        x[..., :half], x[..., half:2 * half] = rotated
