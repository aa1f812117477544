"""Plain-torch reference of paged causal attention, shared by the prefill and decode kernels.

Sequence i's queries are q[cu_q[i]:cu_q[i+1]]; its keys/values are the first seq_lens[i] slots
of its block table. Query j of a sequence with q_len new tokens sits at position
seq_len - q_len + j and attends to keys 0..that position. GQA: query head h reads kv head
h // (num_heads // num_kv_heads). Math in float32; output in q's dtype. An fp8 cache reads as
stored * scale (kernels/kv_quant.py).

Tree verification (speculative decoding with a tree of candidates): `tree_masks` gives each
query token a bitmask over its sequence's query tokens, bit a set where query a is visible
to it (its ancestors and itself); the context before the first query token stays visible to
all. A mask of 0 means plain causal, so chain runs, decodes and prefill chunks mix freely
with tree runs in one step.
"""

from __future__ import annotations

import torch

from kernels.kv_quant import dequantize_kv, take_rows


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A sequence's first seq_len cache rows, in order: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    rows = take_rows(cache, block_table[:num_blocks].long()).reshape(-1, *cache.shape[2:])
    return rows[:seq_len]


def visible_keys(seq_len: int, q_len: int, tree_masks: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """[q_len, seq_len] bool: which keys each of the last q_len positions attends to (causal,
    or by the query tokens' tree masks where nonzero; see the module doc)."""
    device = tree_masks.device if tree_masks is not None else None
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    visible = k_pos <= q_pos
    if tree_masks is not None:
        offset = k_pos - (seq_len - q_len)
        bit = (tree_masks.long()[:, None] >> offset.clamp(0, 62)) & 1
        tree = (offset < 0) | bit.bool()
        visible = torch.where(tree_masks[:, None] != 0, tree, visible)
    return visible


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    cu_q: list[int],
    seq_lens: list[int],
    scale: float,
    k_scale: torch.Tensor | None = None,  # [1] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,
    tree_masks: torch.Tensor | None = None,  # [num_tokens] int32, 0: causal
) -> torch.Tensor:
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    for i, seq_len in enumerate(seq_lens):
        q_i = q[cu_q[i]:cu_q[i + 1]].float().transpose(0, 1)  # [H, q_len, D]
        q_len = q_i.shape[1]
        if q_len == 0:
            continue
        k = dequantize_kv(gather_kv(k_cache, block_tables[i], seq_len), k_scale)
        v = dequantize_kv(gather_kv(v_cache, block_tables[i], seq_len), v_scale)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq_len, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q_i @ k.transpose(1, 2)) * scale
        masks = None if tree_masks is None else tree_masks[cu_q[i]:cu_q[i + 1]].to(q.device)
        visible = visible_keys(seq_len, q_len, masks).to(q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[cu_q[i]:cu_q[i + 1]] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out
