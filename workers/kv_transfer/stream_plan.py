"""Which bytes a layer-wise KV stream moves: pure arithmetic shared by both ends.

A prefill step writes tokens [start, end) of a prompt; the blocks they touch go to the same
block indices of the decode worker's reservation. Blocks are coalesced into runs contiguous on
BOTH ends, so each run of each layer is one contiguous K view and one V view of the cache:
the sender sends straight from its cache and the receiver receives straight into its reserved
blocks, with no pack, no staging and no allocation. Where the pair's plan is a head slice of
either end (TP ranks of different sizes) or the blocks are scattered into many runs, one
layer's blocks are packed into one buffer (one kernel each side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.kv_transfer.layout import KVLayout, TransferPlan


@dataclass(frozen=True)
class PrefillSpan:
    """Prompt tokens [start, end) of `request_id` computed this step, in `block_table`."""

    request_id: str
    start: int
    end: int
    block_table: list[int]


def touched_blocks(start: int, end: int, block_size: int) -> range:
    """Block indices (into a block table) that tokens [start, end) write."""
    return range(start // block_size, -(-end // block_size))


def block_runs(src_ids: list[int], dest_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src_first, dest_first, length) runs, each contiguous on both ends, covering the
    pairs (src_ids[i], dest_ids[i]) in order."""
    runs: list[list[int]] = []
    for src, dest in zip(src_ids, dest_ids, strict=True):
        last = runs[-1] if runs else None
        if last and src == last[0] + last[2] and dest == last[1] + last[2]:
            last[2] += 1
        else:
            runs.append([src, dest, 1])
    return [tuple(run) for run in runs]


MAX_DIRECT_RUNS = 16
"""More runs than this in one layer's step go packed: a message per run would cost more in
per-message latency (~10 us each with NCCL) than the pack kernel's copy."""


def use_packed(direct: bool, runs_per_layer: int) -> bool:
    """Whether one step's layers travel packed (one message per layer)."""
    return not direct or runs_per_layer > MAX_DIRECT_RUNS


def is_direct(plan: TransferPlan, sender: KVLayout, receiver: KVLayout) -> bool:
    """True when the plan covers every kv head both ends hold: a run of blocks is then
    contiguous memory on both ends."""
    heads = (plan.kv_head_start, plan.kv_head_end)
    return heads == (sender.kv_head_start, sender.kv_head_end) == \
        (receiver.kv_head_start, receiver.kv_head_end)


def run_views(k_cache: torch.Tensor, v_cache: torch.Tensor,
              runs: list[tuple[int, int]]) -> list[torch.Tensor]:
    """K then V view of each (first_block, num_blocks) run: the buffers of one layer's sends
    (or receives), in wire order."""
    views = []
    for first, count in runs:
        views += [k_cache[first:first + count], v_cache[first:first + count]]
    return views


def staged_bytes(layout: KVLayout, plan: TransferPlan, num_blocks: int) -> int:
    """Bytes of one layer's packed buffer of `num_blocks` blocks (K and V)."""
    return 2 * num_blocks * layout.block_size * plan.num_kv_heads * layout.head_dim * \
        layout.element_size
