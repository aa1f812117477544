"""Which bytes a layer-wise KV stream moves: pure arithmetic shared by both ends.

A prefill step writes tokens [start, end) of a prompt; the blocks they touch go to the same
block indices of the decode worker's reservation. Blocks are coalesced into runs contiguous on
BOTH ends, so each run of each layer is one contiguous K view and one V view of the cache:
the sender sends straight from its cache and the receiver receives straight into its reserved
blocks, with no pack, no staging and no allocation. Where the pair's plan is a head slice of
either end (TP ranks of different sizes), the blocks are scattered into many runs, or the
runs' messages would be small (latency-bound: TransferConfig.coalesce_below_bytes), the
blocks are packed (one kernel each side) into staged messages of K and V together: one per
layer while streaming, several layers per message (up to TransferConfig.message_bytes) for a
request sent whole (`wire_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.kv_transfer.config import TransferConfig
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
    pairs (src_ids[i], dest_ids[i]) in order. Both ascending without gaps (what the
    lowest-first block pool hands out) is one run, found by two list compares (~60 us
    instead of the loop's ~250 us at 1024 blocks, a 16k-token request, on a 2-core CPU:
    host time before the announce)."""
    if len(src_ids) != len(dest_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dest_ids)} destinations")
    if src_ids and src_ids == list(range(src_ids[0], src_ids[0] + len(src_ids))) and \
            dest_ids == list(range(dest_ids[0], dest_ids[0] + len(dest_ids))):
        return [(src_ids[0], dest_ids[0], len(src_ids))]
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


COALESCE_WHOLE_BYTES = 1 << 20
"""CUDA default of TransferConfig.coalesce_whole_below_bytes. Below ~1 MiB a message's
wire time on NVLink (~3 us) is a fraction of the host's ~12 us to post it, and packing all
of a request's layers is one launch; at and above the sizes where staging measured slower
on 2x H200 (4k tokens: 4-8 MiB messages, 2026-11-27) requests still go direct."""


STAGING_SLOTS = 4
"""CUDA: staged messages of one post cycle through this many buffers (stream-ordered reuse),
so staging memory stays at STAGING_SLOTS x message_bytes per post, whatever the request."""


@dataclass(frozen=True)
class WirePlan:
    """How one step's layers of one pair go on the wire: the runs' K and V views straight
    from the cache (`packed` False), or staged messages of `layers_per_message` whole layers
    (K and V of every block of the step) each."""

    packed: bool
    layers_per_message: int = 1

    def messages(self, layers: range) -> list[range]:
        """The layer ranges of the staged messages that carry `layers`, in wire order."""
        step = self.layers_per_message
        return [range(first, min(first + step, layers.stop))
                for first in range(layers.start, layers.stop, step)]


def coalesce_below(config: TransferConfig, whole: bool, one_launch: bool) -> int:
    """Direct messages below this size go staged: `config.coalesce_below_bytes`, or for a
    request sent whole (`whole`) at least `config.coalesce_whole_below_bytes` (None:
    COALESCE_WHOLE_BYTES where `one_launch` packs every layer, else 0)."""
    if not whole:
        return config.coalesce_below_bytes
    below = config.coalesce_whole_below_bytes
    if below is None:
        below = COALESCE_WHOLE_BYTES if one_launch else 0
    return max(config.coalesce_below_bytes, below)


def wire_plan(config: TransferConfig, direct: bool, runs_per_layer: int, layer_bytes: int,
              whole: bool, one_launch: bool = False) -> WirePlan:
    """The wire plan of one step: `layer_bytes` is one layer's K and V of the step's blocks;
    `whole`: every layer is posted at once (a prefilled request sent whole), so messages may
    span layers (up to `config.message_bytes`); a layer-wise stream posts each layer after
    its compute, one layer per message. Direct runs when their messages are large enough
    (`coalesce_below`; `one_launch`: the sender packs every layer in one launch), few
    enough and whole-head."""
    small = layer_bytes < 2 * runs_per_layer * coalesce_below(config, whole, one_launch)
    if direct and runs_per_layer <= MAX_DIRECT_RUNS and not small:
        return WirePlan(False)
    per_message = max(1, config.message_bytes // max(1, layer_bytes)) if whole else 1
    return WirePlan(True, per_message)


def message_sizes(layout: KVLayout, plan: TransferPlan, runs: list[tuple[int, int, int]],
                  wire: WirePlan) -> list[int]:
    """Bytes of each message one step of `runs` puts on the wire under `wire` (for the
    benchmark's table and the tests)."""
    block_bytes = staged_bytes(layout, plan, 1) // 2
    layers = range(plan.layer_start, plan.layer_end)
    if not wire.packed:
        return [n * block_bytes for _ in layers for _, _, n in runs for _ in range(2)]
    num_blocks = sum(n for _, _, n in runs)
    return [len(group) * staged_bytes(layout, plan, num_blocks)
            for group in wire.messages(layers)]


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
