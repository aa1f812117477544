"""Paged decode attention (flash-decoding): 1..8 query tokens per sequence over its block table.

One program handles one (sequence, kv head, KV split): the query rows are all query heads of
that kv head's group times the sequence's query tokens, so each KV tile is loaded once for the
whole group (GQA). With several query tokens (speculative verification) token j sits at position
seq_len - q_len + j and sees keys up to there (causal among the new tokens).

Long contexts at small batch cannot fill the GPU with one program per (sequence, kv head), so
the context is split into `num_splits` ranges; each writes a normalized partial output and its
log-sum-exp, and a reduce kernel combines them. With one split the kernel writes the output
directly. Sequences with more than `max_q_len` new tokens are skipped (the prefill kernel takes
them in the same step). An fp8 cache is dequantized in the kernel (kernels/kv_quant.py): half
the bytes of bf16 per KV tile.

Tree verification (`tree_masks`, speculative decoding with a tree of candidates, see
kernels/attention_ref.py): the context before a sequence's first query token is folded as
usual, then the split holding that token folds the <= 8 query tokens' own keys in one tile
under each row's ancestor bitmask (0: causal). Without tree_masks the kernel is compiled
without that path (TREE=False) and runs exactly as before.
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
    attend_range,
    combine_splits,
    dot_precision,
    head_dim_block,
    kv_scales,
    mma_query,
    num_sms,
    split_scratch,
    store_split,
)
from kernels.flash_prefill import check_paged_inputs
from kernels.kv_quant import is_fp8

MAX_DECODE_QUERY = 8


@dataclass(frozen=True)
class DecodeTiles:
    block_n: int
    num_warps: int
    num_stages: int


_GPU_TILES = DecodeTiles(64, 4, 3)
_GPU_FP8_TILES = DecodeTiles(128, 4, 3)
"""An fp8 cache's tiles on the GPU: 128 keys per tile (float16 operands, `mma_query`) took
0.66-0.91x the time of 64-key tiles over batch x context 1 x 16k .. 256 x 1k on an H200
(docs/perf.md, FP8 KV cache)."""
_CPU_TILES = DecodeTiles(16, 4, 1)


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    bt_ptr, cu_q_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr, tree_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch,
    qk_scale, head_dim, num_heads, num_splits, max_q_len,
    GROUP: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, FP8: tl.constexpr, TREE: tl.constexpr, BLOCK_T: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if q_len <= max_q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        qk_scale, v_scale = kv_scales(qk_scale, k_scale_ptr, v_scale_ptr, FP8)
        rows = tl.arange(0, BLOCK_M)
        tok_in_seq = rows // GROUP
        head = kvh * GROUP + rows % GROUP
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = tok_in_seq < q_len
        io_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
        tok = (q_start + tok_in_seq).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        q_pos = seq_len - q_len + tok_in_seq
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
        n_lo = split * tiles_per_split * BLOCK_N
        n_hi = tl.minimum(seq_len, n_lo + tiles_per_split * BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        seq_bt_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
        if TREE:
            base = seq_len - q_len
            # The context: keys before the first query token (masked as the sequence's end).
            acc, l_i, m_i = attend_range(
                acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, seq_bt_ptr, kvh,
                n_lo, tl.minimum(n_hi, base), base, qk_scale, head_dim,
                stride_cb, stride_cs, stride_ch, True, PAGE, BLOCK_N, BLOCK_D, EVEN_D, PRECISION)
            if (n_lo <= base) & (base < n_hi):
                tree_mask = tl.load(tree_ptr + tok, mask=row_ok, other=0)
                acc, l_i, m_i = _attend_tree(
                    acc, l_i, m_i, q, tok_in_seq, tree_mask, k_cache_ptr, v_cache_ptr,
                    seq_bt_ptr, kvh, base, q_len, qk_scale, head_dim,
                    stride_cb, stride_cs, stride_ch, PAGE, BLOCK_T, BLOCK_D, PRECISION)
        else:
            # One masked loop over the whole split: splitting off the unmasked tiles (as
            # prefill does) measured up to 7x slower here on H100 / Triton 3.6 (docs/perf.md).
            acc, l_i, m_i = attend_range(
                acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, seq_bt_ptr, kvh,
                n_lo, n_hi, seq_len, qk_scale, head_dim, stride_cb, stride_cs, stride_ch,
                True, PAGE, BLOCK_N, BLOCK_D, EVEN_D, PRECISION)
        store_split(out_ptr, part_out_ptr, part_lse_ptr, acc, l_i, m_i, tok, head, split,
                    row_ok, v_scale, stride_ot, stride_oh, head_dim, num_heads, num_splits,
                    FP8, SINGLE_SPLIT, BLOCK_D)


@triton.jit
def _attend_tree(
    acc, l_i, m_i, q, tok_in_seq, tree_mask, k_cache_ptr, v_cache_ptr, bt_ptr, kvh,
    base, q_len, qk_scale, head_dim, stride_cb, stride_cs, stride_ch,
    PAGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold the query tokens' own keys (positions base..base + q_len) into (acc, l_i, m_i):
    a row sees key base + a where bit a of its tree mask is set, or (mask 0) where a <= its
    own index."""
    q = mma_query(q, k_cache_ptr)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_t < q_len
    d_ok = offs_d < head_dim
    offs_n = base + offs_t
    block = tl.load(bt_ptr + offs_n // PAGE, mask=key_ok, other=0)
    row_off = (block.to(tl.int64) * stride_cb + (offs_n % PAGE) * stride_cs
               + kvh.to(tl.int64) * stride_ch)
    k = tl.load(k_cache_ptr + row_off[None, :] + offs_d[:, None],
                mask=key_ok[None, :] & d_ok[:, None], other=0.0).to(q.dtype)
    qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    in_tree = ((tree_mask[:, None] >> offs_t[None, :]) & 1) != 0
    causal = offs_t[None, :] <= tok_in_seq[:, None]
    visible = key_ok[None, :] & tl.where(tree_mask[:, None] != 0, in_tree, causal)
    qk = tl.where(visible, qk, float("-inf"))
    v = tl.load(v_cache_ptr + row_off[:, None] + offs_d[None, :],
                mask=key_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      num_sms: int, block_n: int) -> int:
    """Enough (sequence, kv head, split) programs for ~2 waves of the GPU, but each split keeps
    at least 4 KV tiles so the reduce stays cheap."""
    want = triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    most = max(1, triton.cdiv(max_seq_len, 4 * block_n))
    return int(max(1, min(want, most, 64)))


def _launch_decode(q, k_cache, v_cache, block_tables, cu_q, seq_lens, out, num_splits,
                   max_q_len, scale, tiles: DecodeTiles, k_scale, v_scale,
                   tree_masks=None) -> None:
    num_seqs, (num_heads, head_dim) = seq_lens.shape[0], q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_d = head_dim_block(head_dim)
    single = num_splits == 1
    fp8 = is_fp8(k_cache.dtype)
    part_out, part_lse = (out, out) if single else split_scratch(q, num_splits)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, cu_q, seq_lens,
        k_scale if fp8 else cu_q, v_scale if fp8 else cu_q,
        cu_q if tree_masks is None else tree_masks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scale * LOG2E, head_dim, num_heads, num_splits, max_q_len,
        GROUP=group, PAGE=k_cache.shape[1],
        BLOCK_M=max(16, triton.next_power_of_2(group * max_q_len)),
        BLOCK_N=tiles.block_n, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
        PRECISION=dot_precision(q.dtype), SINGLE_SPLIT=single, FP8=fp8,
        TREE=tree_masks is not None, BLOCK_T=16,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl.launch(q.device),
    )
    if not single:
        combine_splits(out, part_out, part_lse, cu_q, 0, max_q_len)


def default_tiles(device: torch.device, cache_dtype: torch.dtype) -> DecodeTiles:
    """The decode tiles for a cache of `cache_dtype` on `device`."""
    if device.type != "cuda":
        return _CPU_TILES
    return _GPU_FP8_TILES if is_fp8(cache_dtype) else _GPU_TILES


def paged_decode(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    cu_q: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    max_seq_len: int,
    scale: float,
    max_q_len: int = 1,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    tiles: DecodeTiles | None = None,
    k_scale: torch.Tensor | None = None,  # [1] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,
    tree_masks: torch.Tensor | None = None,  # [num_tokens] int32 ancestor bitmasks, 0: causal
) -> torch.Tensor:
    """Attention of every sequence with <= max_q_len (<= 8) new tokens; writes their rows of
    `out` (allocated if None), leaving other rows untouched. `num_splits` None: chosen from the
    batch, the kv heads and the GPU's SM count. `tree_masks`: see the module doc."""
    out = torch.empty_like(q) if out is None else out
    check_paged_inputs(q, k_cache, v_cache, block_tables, cu_q, seq_lens, out, k_scale, v_scale)
    assert 1 <= max_q_len <= MAX_DECODE_QUERY, f"max_q_len {max_q_len} not in 1..8"
    assert tree_masks is None or (tree_masks.shape == q.shape[:1]
                                  and tree_masks.dtype == torch.int32), "tree_masks [T] int32"
    if seq_lens.shape[0] == 0:
        return out
    tiles = tiles or default_tiles(q.device, k_cache.dtype)
    if num_splits is None:
        num_splits = choose_num_splits(seq_lens.shape[0], k_cache.shape[2], max_seq_len,
                                       num_sms(q.device), tiles.block_n)
    _launch_decode(q, k_cache, v_cache, block_tables, cu_q, seq_lens, out, num_splits,
                   max_q_len, scale, tiles, k_scale, v_scale, tree_masks)
    return out


paged_decode_ref = paged_attention_ref
