"""The reference attention backend in plain torch: slow, obviously correct, runs anywhere.

Per sequence, gathers its keys/values from the paged cache through its block table and
applies a causal mask in which the query tokens are the last q_len of the seq_len context.
Prefill, chunked prefill, decode and multi-token verification are one path; sequences with
one query token (decode) are batched into one op, the others loop. An fp8 cache is quantized
on write and dequantized on read in torch (kernels/kv_quant.py: the kernels' references).
"""

from __future__ import annotations

import torch

from kernels.attention_ref import gather_kv, visible_keys
from kernels.kv_quant import dequantize_kv, put_rows, take_rows, to_cache
from workers.attention.backend import AttentionBackend, AttentionMetadata


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Stores each new token's k/v at its slot (block_id * block_size + offset)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    put_rows(k_cache.view(-1, num_kv_heads, head_dim), slot_mapping,
             to_cache(k, k_cache.dtype, k_scale))
    put_rows(v_cache.view(-1, num_kv_heads, head_dim), slot_mapping,
             to_cache(v, v_cache.dtype, v_scale))


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    tree_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [q_len, H, d] are the last q_len positions of k/v [seq_len, kvh, d] (float32, or
    widened here); fp32 softmax. `tree_masks` [q_len]: tree verification (see
    kernels/attention_ref.py), else causal."""
    q_len, num_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = k.shape
    # Query heads grouped under their kv head: GQA without copying K/V per query head.
    grouped = q.float().view(q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("qkgd,lkd->kgql", grouped, k.float()) * scale
    if tree_masks is None:
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        key_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores.masked_fill_(key_pos > query_pos, float("-inf"))
    else:
        scores.masked_fill_(~visible_keys(seq_len, q_len, tree_masks), float("-inf"))
    out = torch.einsum("kgql,lkd->qkgd", torch.softmax(scores, dim=-1), v.float())
    return out.reshape(q_len, num_heads, head_dim).to(q.dtype)


def batched_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence (q [S, H, d], the last position of each): all sequences
    in one batched op over their block tables, padded to `max_len` (an upper bound of
    seq_lens known on the host; None reads it from the device) and masked.

    Slots past a sequence's length are never read into the result, even if they hold NaN or
    Inf (unowned blocks, freed blocks, another sequence's garbage): their scores are masked
    and their values zeroed, because a probability of 0 times NaN is still NaN."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max()) if max_len is None else max_len
    blocks = block_tables[:, : -(-max_len // block_size)].long()
    keys = dequantize_kv(take_rows(k_cache, blocks).reshape(
        num_seqs, -1, num_kv_heads, head_dim)[:, :max_len], k_scale)
    values = dequantize_kv(take_rows(v_cache, blocks).reshape(
        num_seqs, -1, num_kv_heads, head_dim)[:, :max_len], v_scale)
    grouped = q.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("skgd,slkd->skgl", grouped, keys) * scale
    key_pos = torch.arange(max_len, device=q.device)
    padding = key_pos[None, :] >= seq_lens[:, None].long()
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    values = values.masked_fill(padding[:, :, None, None], 0.0)
    out = torch.einsum("skgl,slkd->skgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def padded_decode_bytes(num_seqs: int, max_len: int, num_kv_heads: int, head_dim: int) -> int:
    """Float32 K+V that `batched_decode_attention` gathers for num_seqs rows padded to
    max_len: under CUDA graphs every step pays for the padded width (max_model_len)."""
    return 2 * num_seqs * max_len * num_kv_heads * head_dim * 4


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        starts = meta.query_start_loc_host
        num_seqs = len(meta.seq_lens_host)
        single = [i for i in range(num_seqs) if starts[i + 1] - starts[i] == 1]
        if len(single) == num_seqs:
            # Pure decode (the common step): one batched op instead of a Python loop. The
            # host-side bound avoids a device sync, so CUDA graphs can capture this path.
            return batched_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len,
                k_scale, v_scale,
            )
        out = torch.empty_like(q)
        if single:
            seqs = torch.tensor(single, device=q.device)
            tokens = torch.tensor([starts[i] for i in single], device=q.device)
            longest = max(meta.seq_lens_host[i] for i in single)
            out[tokens] = batched_decode_attention(
                q[tokens], k_cache, v_cache, meta.block_tables[seqs], meta.seq_lens[seqs], scale,
                longest, k_scale, v_scale,
            )
        for i in sorted(set(range(num_seqs)) - set(single)):
            table, seq_len = meta.block_tables[i], meta.seq_lens_host[i]
            keys = dequantize_kv(gather_kv(k_cache, table, seq_len), k_scale)
            values = dequantize_kv(gather_kv(v_cache, table, seq_len), v_scale)
            tree = None if meta.tree_masks is None else meta.tree_masks[starts[i] : starts[i + 1]]
            out[starts[i] : starts[i + 1]] = causal_attention(
                q[starts[i] : starts[i + 1]], keys, values, scale, tree
            )
        return out
