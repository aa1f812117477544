"""The inner loop shared by the prefill and decode kernels: online softmax over KV tiles
read from the paged cache through a block table.

A tile is BLOCK_N consecutive key positions of one sequence; key n lives in block
block_table[n // PAGE], slot n % PAGE. Scores are kept in base 2 (qk_scale includes log2(e))
so the exponential is exp2. Running max starts at a large finite negative number, not -inf,
so a row whose keys are all masked in a tile stays NaN-free.

K and V tiles are widened to the query's dtype as they are loaded (a no-op unless the cache is
fp8); an fp8 cache's scales are applied by the callers, the K scale folded into qk_scale and
the V scale into the final output (kernels/kv_quant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attend_range(
    acc, l_i, m_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, bt_ptr, kvh,
    n_lo, n_hi, seq_len, qk_scale, head_dim,
    stride_cb, stride_cs, stride_ch,
    MASKED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold keys [n_lo, n_hi) into (acc, l_i, m_i). MASKED: apply the causal mask
    (key <= q_pos) and the sequence end; otherwise every key is known visible to every row."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_head_off = kvh.to(tl.int64) * stride_ch
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        if MASKED:
            block = tl.load(bt_ptr + offs_n // PAGE, mask=offs_n < seq_len, other=0)
        else:
            block = tl.load(bt_ptr + offs_n // PAGE)
        row_off = block.to(tl.int64) * stride_cb + (offs_n % PAGE) * stride_cs + kv_head_off
        k_ptrs = k_cache_ptr + row_off[None, :] + offs_d[:, None]
        v_ptrs = v_cache_ptr + row_off[:, None] + offs_d[None, :]
        if EVEN_D:
            k = tl.load(k_ptrs).to(q.dtype)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0).to(q.dtype)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < seq_len)
            qk = tl.where(visible, qk, float("-inf"))
            # Slots past the sequence end may hold garbage (even NaN): zero their values.
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < seq_len) & d_ok[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        v = v.to(q.dtype)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attend_causal(
    acc, l_i, m_i, q, q_pos, first_q_pos,
    k_cache_ptr, v_cache_ptr, bt_ptr, kvh,
    n_lo, n_hi, seq_len, qk_scale, head_dim,
    stride_cb, stride_cs, stride_ch,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold keys [n_lo, n_hi) causally: whole tiles at or before `first_q_pos` (the smallest
    query position of the rows) are visible to every row and run without masks; the tiles
    that cross the diagonal or the sequence end run masked. n_lo must be tile-aligned."""
    n_split = tl.minimum(tl.maximum((first_q_pos + 1) // BLOCK_N * BLOCK_N, n_lo), n_hi)
    acc, l_i, m_i = attend_range(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_ptr, kvh,
        n_lo, n_split, seq_len, qk_scale, head_dim, stride_cb, stride_cs, stride_ch,
        False, PAGE, BLOCK_N, BLOCK_D, EVEN_D, PRECISION)
    return attend_range(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_ptr, kvh,
        n_split, n_hi, seq_len, qk_scale, head_dim, stride_cb, stride_cs, stride_ch,
        True, PAGE, BLOCK_N, BLOCK_D, EVEN_D, PRECISION)


@triton.jit
def kv_scales(qk_scale, k_scale_ptr, v_scale_ptr, FP8: tl.constexpr):
    """(qk_scale with the K scale folded in, the V scale) of an fp8 cache; (qk_scale, 1)
    otherwise, where the scale pointers are never read."""
    v_scale = 1.0
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    return qk_scale, v_scale


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use exact IEEE products (no tf32) so fp32 runs match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_dim_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))
