"""What the scheduler hands the model runner for one forward pass.

The scheduler (pure CPU bookkeeping) decides which sequences run this step and how many of
their tokens; the runner turns this into tensors, runs the model and returns logits. Every
field is a plain Python list so it can be built and tested without torch.

Tokens of all scheduled sequences are packed along one axis, sequence by sequence, in the
order of `seq_ids`. A decode sequence contributes 1 token (or 1 + k when verifying k
speculative tokens); a prefill sequence contributes one chunk of its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInput:
    seq_ids: list[str]
    """The scheduled sequences, in packing order."""
    token_ids: list[int]
    """All new tokens of this step, packed: len == query_start_loc[-1]."""
    positions: list[int]
    """Position in its own sequence of each packed token (0-based)."""
    slot_mapping: list[int]
    """KV cache slot of each packed token: block_id * block_size + offset. The runner writes
    each new token's K and V there before attention reads the cache."""
    query_start_loc: list[int]
    """cu_seqlens of the queries: sequence i's new tokens are token_ids[q[i]:q[i+1]]."""
    seq_lens: list[int]
    """Context length of each sequence after this step (cached tokens + new tokens).
    The new tokens are the last ones: a query at position p attends to keys 0..p."""
    block_tables: list[list[int]]
    """Block ids of each sequence, in order, covering at least seq_lens[i] tokens."""
    logits_indices: list[int]
    """Indices into the packed tokens whose logits are returned, in this order. Usually the
    last token of each sequence whose prompt is complete after this step; every token of a
    verification run for speculative decoding."""
    tree_masks: list[int] | None = None
    """Tree verification only: per packed token, the bitmask of its sequence's new tokens it
    attends to (0: causal); see workers/spec/tree.py."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)
