"""The attention interface every backend implements.

Invariants (all backends):
- K/V caches are per layer, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
- `forward` first writes this step's new k/v into the cache at `slot_mapping`, then each
  query token attends causally to keys 0..its position of its own sequence, read from the
  cache through the sequence's block table. So chunked prefill, prefix-cached prompts,
  decode and multi-token verification are all the same call.
- GQA/MQA: query head h uses kv head h // (num_heads // num_kv_heads).
- Output has the query's dtype; softmax is computed in float32.
- The caches have the model's dtype, or are fp8 (e4m3, `--kv-cache-dtype fp8`): new k/v are
  stored as k / k_scale, v / v_scale and read back times the scale (kernels/kv_quant.py); the
  scales are the layer's, 1-element float32 tensors on the caches' device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Device tensors built once per step by the runner from a StepInput."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cu_seqlens of queries
    seq_lens: torch.Tensor  # [num_seqs] int32, context length incl. new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop per sequence (the torch reference).
    query_start_loc_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]
    tree_masks: torch.Tensor | None = None
    """[num_tokens] int32, tree verification only (workers/spec/tree.py): each query token's
    bitmask of the query tokens of its sequence it sees (its ancestors and itself) besides
    the context; 0: causal (kernels/attention_ref.py)."""
    device_query_lens: bool = False
    """The rows' query lengths are known only on the device: a CUDA-graphed prefill step
    (workers/engine/prefill_graph.py), replayed for any split of its tokens between its rows.
    max_query_len is then an upper bound and query_start_loc_host only the captured layout;
    the Triton backend runs every row through the prefill kernel. The torch backend, which
    slices rows on the host, never gets such a step."""


class AttentionBackend(ABC):
    """One instance per model; `forward` is called once per layer per step."""

    name: str
    fuses_rope = False
    """True when `forward` takes `rope=(positions, cos, sin)` with q, k unrotated and rotates
    them as part of its cache write (workers/model/ops.py's FusedOps passes it)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,  # [1] float32, read for fp8 caches only
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write k/v into the cache at meta.slot_mapping, then attend (see module doc)."""
