"""The inner loop shared by the prefill and decode kernels: online softmax over KV tiles
read from the paged cache through a block table; and their split-KV pieces: `store_split`
(one program's normalized output, or its partial and log-sum-exp), `combine_splits` (the
log-sum-exp-weighted merge of the partials) and the scratch they share.

A tile is BLOCK_N consecutive key positions of one sequence; key n lives in block
block_table[n // PAGE], slot n % PAGE. Scores are kept in base 2 (qk_scale includes log2(e))
so the exponential is exp2. Running max starts at a large finite negative number, not -inf,
so a row whose keys are all masked in a tile stays NaN-free.

K and V tiles are widened to the query's dtype as they are loaded (a no-op unless the cache is
fp8); an fp8 cache's scales are applied by the callers, the K scale folded into qk_scale and
the V scale into the final output (kernels/kv_quant.py). Against an fp8 cache, 16-bit queries
multiply in float16 (`mma_query`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl

LOG2E = 1.4426950408889634


FP16_MAX: tl.constexpr = tl.constexpr(65504.0)


@triton.jit
def mma_query(q, k_cache_ptr):
    """q as the tensor cores take it against the tiles of `k_cache_ptr`: against an fp8 (e4m3)
    cache a 16-bit q goes to float16, clamped to its range, and K and V tiles widen to float16
    (`.to(q.dtype)`), and the probabilities round to float16 before P V. e4m3 widens to
    float16 exactly in one conversion per pair of values; to bfloat16 it took several
    instructions per value, which made decode over an fp8 cache up to 1.9x slower than over a
    bf16 one (docs/perf.md). A bfloat16 q is exact in float16 from 6.1e-5 to 65504 in magnitude
    (float16 keeps 3 more mantissa bits); smaller components keep an absolute precision of
    6e-8, larger ones are clamped. Any other cache or a float32 q: q itself."""
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        if q.dtype != tl.float32:
            q = tl.clamp(q.to(tl.float32), -FP16_MAX, FP16_MAX).to(tl.float16)
    return q


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
    q = mma_query(q, k_cache_ptr)
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


@triton.jit
def store_split(out_ptr, part_out_ptr, part_lse_ptr, acc, l_i, m_i, tok, head, split,
                row_ok, v_scale, stride_ot, stride_oh, head_dim, num_heads, num_splits,
                FP8: tl.constexpr, SINGLE_SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalize one program's (acc, l_i, m_i) of rows `tok` x heads `head` (both [rows]) and
    store it: into `out` when the keys were not split; otherwise as split `split`'s partial
    output and base-2 log-sum-exp (-inf for a row that saw no key: an empty split) into the
    float32 scratch of `split_scratch`, for `combine_splits`. An fp8 cache's V scale is
    applied here, to the output or to each partial (the combine is linear in them)."""
    offs_d = tl.arange(0, BLOCK_D)
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    if FP8:
        acc = acc * v_scale
    if SINGLE_SPLIT:
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh
                 + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
    else:
        part_row = (tok * num_heads + head) * num_splits + split
        tl.store(part_out_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], acc,
                 mask=row_ok[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, cu_q_ptr,
    stride_ot, stride_oh, head_dim, num_heads, num_splits, min_q_len, max_q_len,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    t_start = tl.program_id(2) * BLOCK_T
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if (q_len >= min_q_len) & (q_len <= max_q_len) & (t_start < q_len):
        rows = t_start + tl.arange(0, BLOCK_T)
        splits = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        tok = (q_start + rows).to(tl.int64)
        ok = (rows < q_len)[:, None] & (splits < num_splits)[None, :]  # [T, S]
        part_row = (tok * num_heads + head)[:, None] * num_splits + splits[None, :]
        lse = tl.load(part_lse_ptr + part_row, mask=ok, other=float("-inf"))
        # Every real row saw its own key in some split, so its max is finite; a padding row
        # (-inf everywhere) gets weights of 0 instead of NaN and is never stored.
        lse_max = tl.max(lse, 1)
        weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max)[:, None])
        weight = weight / tl.where(lse_max == float("-inf"), 1.0, tl.sum(weight, 1))[:, None]
        part = tl.load(part_out_ptr + part_row[:, :, None] * BLOCK_D + offs_d[None, None, :],
                       mask=ok[:, :, None], other=0.0)
        # An empty split has weight 0 and its stored partial is 0 too, never NaN.
        out = tl.sum(part * weight[:, :, None], 1)
        tl.store(out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty),
                 mask=(rows < q_len)[:, None] & (offs_d[None, :] < head_dim))


def split_scratch(q: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial outputs [tokens, heads, splits, padded head dim] and log-sum-exps
    [tokens, heads, splits] of `store_split` / `combine_splits`."""
    tokens, heads = q.shape[0], q.shape[1]
    part_out = torch.empty((tokens, heads, num_splits, head_dim_block(q.shape[2])),
                           dtype=torch.float32, device=q.device)
    part_lse = torch.empty((tokens, heads, num_splits), dtype=torch.float32, device=q.device)
    return part_out, part_lse


def combine_splits(out: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
                   cu_q: torch.Tensor, min_q_len: int, max_q_len: int) -> None:
    """out rows of every sequence with min_q_len <= q_len <= max_q_len new tokens = the
    log-sum-exp-weighted sum of their split partials; other rows are left untouched."""
    num_seqs, num_heads, num_splits = cu_q.shape[0] - 1, part_lse.shape[1], part_lse.shape[2]
    block_s = triton.next_power_of_2(num_splits)
    # ~64 (row, split) pairs per program: one row per program for decode's many splits.
    block_t = min(triton.next_power_of_2(max_q_len), max(1, 64 // block_s))
    _combine_kernel[(num_seqs, num_heads, triton.cdiv(max_q_len, block_t))](
        out, part_out, part_lse, cu_q, out.stride(0), out.stride(1), out.shape[2], num_heads,
        num_splits, min_q_len, max_q_len,
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=part_out.shape[3], **pdl.launch(out.device),
    )


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (cached per device); 4 off CUDA, so the split
    choices are exercised at small shapes under the interpreter."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]
