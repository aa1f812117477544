"""Flash-attention prefill over the paged KV cache (varlen, causal, GQA/MQA).

Queries of all sequences are packed along the token axis (cu_seqlens); keys and values are read
from the paged cache through each sequence's block table, so chunked prefill and prompts with a
cached prefix see their earlier blocks. One program handles BLOCK_M queries of one head of one
sequence. KV tiles left of the block's causal diagonal run without masks; the diagonal tiles run
masked; tiles right of it are never visited. Query blocks are launched longest-first (the
causal ones at the end of a sequence do the most work) to balance the tail.

Split-KV: a step with few query blocks (a short tail after a long cached prefix: 2 blocks x 32
heads = 64 programs on a 132-SM H100) leaves the GPU half idle while each program walks the
whole context. Then a third grid axis splits each block's keys into `num_splits` tile-aligned
ranges, computed in the kernel from the device's seq_len (a CUDA graph replays one launch at
any context length); each split stores a normalized partial and its log-sum-exp to float32
scratch and `combine_splits` (kernels/attention_tile.py, shared with paged decode) merges
them. The split count is a launch constant (`choose_prefill_splits`); with one split the kernel
writes `out` directly, exactly as without splitting.

Sequences with fewer than `min_q_len` new tokens are skipped, so the decode kernel can take them
in the same step. An fp8 cache is dequantized in the kernel (kernels/kv_quant.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.attention_ref import paged_attention_ref
from kernels.attention_tile import (
    LOG2E,
    attend_causal,
    combine_splits,
    dot_precision,
    head_dim_block,
    kv_scales,
    num_sms,
    split_scratch,
    store_split,
)
from kernels.kv_quant import check_scales, is_fp8


@dataclass(frozen=True)
class PrefillTiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Tuned on H100 (docs/perf.md "Kernels"); keyed by padded head dim.
_GPU_TILES = {
    64: PrefillTiles(128, 64, 4, 3),
    128: PrefillTiles(128, 64, 4, 3),
    256: PrefillTiles(64, 32, 8, 2),
}
_CPU_TILES = PrefillTiles(32, 16, 4, 1)  # interpreter: small tiles keep numpy work small


def default_tiles(head_dim: int, device: torch.device) -> PrefillTiles:
    if device.type != "cuda":
        return _CPU_TILES
    return _GPU_TILES.get(head_dim_block(head_dim), PrefillTiles(64, 32, 4, 2))


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    bt_ptr, cu_q_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch,
    num_heads, qk_scale, min_q_len, head_dim, num_splits,
    GROUP: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, FP8: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    split = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    m_start = m_block * BLOCK_M
    if (q_len >= min_q_len) & (m_start < q_len):
        seq_len = tl.load(seq_lens_ptr + seq)
        qk_scale, v_scale = kv_scales(qk_scale, k_scale_ptr, v_scale_ptr, FP8)
        context = seq_len - q_len
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < q_len
        tok = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        q_pos = context + offs_m
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        bt = bt_ptr + seq.to(tl.int64) * stride_bt
        n_hi = tl.minimum(seq_len, context + m_start + BLOCK_M)
        if SINGLE_SPLIT:
            n_lo = 0
        else:
            # The block's keys [0, n_hi) in num_splits tile-aligned ranges, from the device's
            # seq_len (a graph replays one launch at any context length); the last ranges may
            # be empty (m_i, l_i stay at their start: the split stores lse -inf).
            split_len = tl.cdiv(tl.cdiv(n_hi, BLOCK_N), num_splits) * BLOCK_N
            n_lo = tl.minimum(split * split_len, n_hi)
            n_hi = tl.minimum(n_lo + split_len, n_hi)
        acc, l_i, m_i = attend_causal(
            acc, l_i, m_i, q, q_pos, context + m_start, k_cache_ptr, v_cache_ptr, bt,
            head // GROUP, n_lo, n_hi, seq_len, qk_scale, head_dim,
            stride_cb, stride_cs, stride_ch, PAGE, BLOCK_N, BLOCK_D, EVEN_D, PRECISION)
        store_split(out_ptr, part_out_ptr, part_lse_ptr, acc, l_i, m_i, tok,
                    head + tl.zeros([BLOCK_M], dtype=tl.int32), split, row_ok, v_scale,
                    stride_ot, stride_oh, head_dim, num_heads, num_splits,
                    FP8, SINGLE_SPLIT, BLOCK_D)


def check_paged_inputs(q, k_cache, v_cache, block_tables, cu_q, seq_lens, out,
                       k_scale=None, v_scale=None) -> None:
    """Shape/stride/dtype checks shared by the prefill and decode launchers. The caches have
    the query's dtype, or are fp8 with their scales."""
    assert q.dim() == 3 and q.stride(2) == 1, f"q {tuple(q.shape)} stride {q.stride()}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        f"k_cache {tuple(k_cache.shape)} v_cache {tuple(v_cache.shape)}")
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    num_heads, head_dim = q.shape[1], q.shape[2]
    assert k_cache.shape[3] == head_dim, f"head_dim q {head_dim} vs cache {k_cache.shape[3]}"
    assert num_heads % k_cache.shape[2] == 0, (
        f"num_heads {num_heads} not a multiple of num_kv_heads {k_cache.shape[2]}")
    assert k_cache.dtype == v_cache.dtype and q.dtype == out.dtype, (
        f"dtypes q {q.dtype} k_cache {k_cache.dtype} v_cache {v_cache.dtype} out {out.dtype}")
    assert is_fp8(k_cache.dtype) or q.dtype == k_cache.dtype, (
        f"dtypes q {q.dtype} cache {k_cache.dtype} out {out.dtype}")
    check_scales(k_cache, k_scale, v_scale)
    num_seqs = seq_lens.shape[0]
    assert cu_q.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs, (
        f"cu_q {tuple(cu_q.shape)} block_tables {tuple(block_tables.shape)} seqs {num_seqs}")
    assert block_tables.stride(1) == 1 and cu_q.dtype == seq_lens.dtype == torch.int32
    assert block_tables.dtype == torch.int32, f"block_tables {block_tables.dtype}"
    assert out.shape == q.shape and out.stride(2) == 1, f"out {tuple(out.shape)}"
    page = k_cache.shape[1]
    assert page & (page - 1) == 0, f"block_size {page} must be a power of two"


def choose_prefill_splits(m_blocks: int, num_seqs: int, num_heads: int, max_context: int,
                          num_sms: int, block_n: int) -> int:
    """KV splits per (query block, head): 1 when the m_blocks x num_seqs x num_heads programs
    already fill the GPU or the context is short. Else as many as keep ONE sequence's programs
    within ~2 per SM (rounded down: a third, mostly idle wave would cost a whole split's time
    where one program per SM fits; a prefill graph launches its sequence beside a padding row
    that may be empty, so counting that row would halve the split), each split keeping >= 4
    KV tiles of the longest context, at most 8."""
    if m_blocks * num_seqs * num_heads >= num_sms:
        return 1
    fit = 2 * num_sms // (m_blocks * num_heads)
    most = max_context // (4 * block_n)
    return int(max(1, min(fit, most, 8)))


def flash_prefill(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    cu_q: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, cached + new tokens
    max_q_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    min_q_len: int = 1,
    tiles: PrefillTiles | None = None,
    k_scale: torch.Tensor | None = None,  # [1] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of every sequence with >= min_q_len new tokens; writes those rows of
    `out` (allocated if None) and leaves the others untouched. `num_splits` None: chosen by
    `choose_prefill_splits` from launch constants only (the grid, the SM count and the block
    table's width as the longest context), so a CUDA graph captured with it stays right for
    any context its block table holds; the split ranges come from the device's seq_lens."""
    out = torch.empty_like(q) if out is None else out
    check_paged_inputs(q, k_cache, v_cache, block_tables, cu_q, seq_lens, out, k_scale, v_scale)
    fp8 = is_fp8(k_cache.dtype)
    num_seqs, (num_heads, head_dim) = seq_lens.shape[0], q.shape[1:]
    if num_seqs == 0 or max_q_len < max(min_q_len, 1):
        return out
    tiles = tiles or default_tiles(head_dim, q.device)
    block_d = head_dim_block(head_dim)
    m_blocks = triton.cdiv(max_q_len, tiles.block_m)
    if num_splits is None:
        num_splits = choose_prefill_splits(m_blocks, num_seqs, num_heads,
                                           block_tables.shape[1] * k_cache.shape[1],
                                           num_sms(q.device), tiles.block_n)
    single = num_splits == 1
    part_out, part_lse = (out, out) if single else split_scratch(q, num_splits)
    _prefill_kernel[(m_blocks, num_seqs * num_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, cu_q, seq_lens,
        k_scale if fp8 else cu_q, v_scale if fp8 else cu_q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_heads, scale * LOG2E, min_q_len, head_dim, num_splits,
        GROUP=num_heads // k_cache.shape[2], PAGE=k_cache.shape[1],
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d,
        EVEN_D=block_d == head_dim, PRECISION=dot_precision(q.dtype), FP8=fp8,
        SINGLE_SPLIT=single, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **pdl.launch(q.device),
    )
    if not single:
        combine_splits(out, part_out, part_lse, cu_q, max(min_q_len, 1), max_q_len)
    return out


flash_prefill_ref = paged_attention_ref
