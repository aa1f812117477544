"""A step's device tensors: all of a StepInput's integers moved with one host->device copy.

`build_step_tensors` is what ModelRunner's eager forward feeds the model (CUDA-graph replays
fill their own static buffers instead, workers/engine/cuda_graph.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attention.backend import AttentionMetadata
from workers.device_copy import device_tensor
from workers.engine.step_input import StepInput


@dataclass(frozen=True)
class StepTensors:
    """One step's device tensors (eager path)."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    logits_indices: torch.Tensor  # [num_logits] int64
    meta: AttentionMetadata


def build_step_tensors(step: StepInput, device: torch.device) -> StepTensors:
    """All of a step's integers packed into one tensor and moved with ONE host->device copy
    (pinned, non-blocking on CUDA): per-field copies each cost a launch and, from pageable
    memory, a host wait. Block tables are padded with block 0."""
    width = max((len(table) for table in step.block_tables), default=0)
    packed = [
        *step.token_ids, *step.positions, *step.slot_mapping, *step.logits_indices,
        *step.query_start_loc, *step.seq_lens,
    ]
    for table in step.block_tables:
        packed += table
        packed += [0] * (width - len(table))
    packed += step.tree_masks or []
    host = device_tensor(packed, torch.int64, device)
    n, s = step.num_tokens, step.num_seqs
    sizes = [n, n, n, len(step.logits_indices), s + 1, s, s * width, len(step.tree_masks or [])]
    ids, positions, slots, logits, starts, seq_lens, tables, tree_masks = host.split(sizes)
    starts_host = step.query_start_loc
    query_lens = [starts_host[i + 1] - starts_host[i] for i in range(s)]
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=starts.to(torch.int32),
        seq_lens=seq_lens.to(torch.int32),
        block_tables=tables.to(torch.int32).view(s, width),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(step.seq_lens, default=0),
        query_start_loc_host=tuple(step.query_start_loc),
        seq_lens_host=tuple(step.seq_lens),
        tree_masks=None if step.tree_masks is None else tree_masks.to(torch.int32),
    )
    return StepTensors(ids, positions, logits, meta)
