"""The Triton attention backend: cache write, then paged prefill and decode kernels.

One step may mix decode sequences (1 token), verification runs (2..8 tokens) and prefill
chunks. Sequences with at most 8 new tokens go to the split-KV decode kernel (one KV load per
GQA group); longer ones to the flash prefill kernel. Both read the same cache and write
disjoint rows of one output, so a mixed step is two launches and no gather/scatter.
No host syncs: every decision uses the host-side fields of AttentionMetadata, so decode steps
and single-sequence prefill steps (`device_query_lens`) can be captured in CUDA graphs. An fp8
cache is quantized by the cache write and dequantized inside both attention kernels, with the
layer's scales. Given `rope=(positions, cos, sin)` (fused ops), q and k arrive unrotated and one
kernel rotates q in place and writes the rotated k and v (kernels/rotary_cache_write.py): one
launch per layer fewer, bit for bit the same cache and q.
"""

from __future__ import annotations

import torch

from kernels.cache_write import write_kv_cache
from kernels.flash_prefill import flash_prefill
from kernels.kv_quant import is_fp8
from kernels.paged_decode import MAX_DECODE_QUERY, paged_decode
from kernels.rotary import apply_rotary
from kernels.rotary_cache_write import rotary_cache_write
from workers.attention.backend import AttentionBackend, AttentionMetadata


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


class TritonAttentionBackend(AttentionBackend):
    """Triton kernels from kernels/; same results as the torch backend (fp32 to rounding)."""

    name = "triton"
    fuses_rope = True

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
        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        fp8 = is_fp8(k_cache.dtype)
        if rope is not None and (fp8 or k.dtype == v.dtype == k_cache.dtype):
            rotary_cache_write(q, k, v, k_cache, v_cache, meta.slot_mapping, *rope,
                               k_scale, v_scale)
        else:
            if rope is not None:  # k, v not in the cache's dtype: rotate, then convert
                apply_rotary(q, k, *rope)
            if not fp8:
                k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
            write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        scales = {"k_scale": k_scale, "v_scale": v_scale}
        tree = {} if meta.tree_masks is None else {"tree_masks": _int32(meta.tree_masks)}
        out = torch.empty_like(q)
        cu_q = _int32(meta.query_start_loc)
        seq_lens = _int32(meta.seq_lens)
        block_tables = _int32(meta.block_tables)
        if meta.max_query_len <= MAX_DECODE_QUERY:
            return paged_decode(q, k_cache, v_cache, block_tables, cu_q, seq_lens,
                                meta.max_seq_len, scale, max_q_len=meta.max_query_len, out=out,
                                **scales, **tree)
        starts = meta.query_start_loc_host
        # Row lengths known only on the device: the prefill kernel takes every row (it
        # reads each row's length and context from the device; a zero-length row is skipped).
        has_short = not meta.device_query_lens and any(
            starts[i + 1] - starts[i] <= MAX_DECODE_QUERY for i in range(len(starts) - 1))
        if has_short:
            paged_decode(q, k_cache, v_cache, block_tables, cu_q, seq_lens, meta.max_seq_len,
                         scale, max_q_len=MAX_DECODE_QUERY, out=out, **scales, **tree)
        return flash_prefill(q, k_cache, v_cache, block_tables, cu_q, seq_lens,
                             meta.max_query_len, scale, out=out,
                             min_q_len=MAX_DECODE_QUERY + 1 if has_short else 1, **scales)
