"""The KV block pool: pure CPU bookkeeping of which cache blocks are free (nano-vllm style).

A block id is an index on axis 0 of every layer's K/V cache. The pool keeps a free list and
a reference count per block; a sequence's blocks are its `block_table`, grown as its tokens
get KV and shrunk when speculative slots are rolled back.

Prefix caching (workers/engine/prefix_cache.py): with a `PrefixCache`, a block whose last
reference goes and that has a name is *parked* there instead of joining the free list; it
still counts as free (evictable) and is evicted, least recently parked first, only when the
free list is empty. `share` revives a parked block. So `num_free == num_blocks` still means
no block is referenced: nothing leaked.

Seam left for later (not implemented now):
- Speculative decoding: `append_slots` to num_tokens + k before verification, then
  `rollback_slots` to the accepted length; the pair leaves the free count as it was.
"""

from __future__ import annotations

import heapq

from workers.engine.prefix_cache import PrefixCache
from workers.errors import NoCapacity


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` slots."""
    return -(-num_tokens // block_size)


class BlockPool:
    """Free list plus reference counts over `num_blocks` blocks of `block_size` slots.

    Invariant: a block has reference count 0 iff it is in the free list or parked in the
    prefix cache; `num_free` (both) plus the number of referenced blocks is `num_blocks`.
    """

    def __init__(self, num_blocks: int, block_size: int,
                 prefix_cache: PrefixCache | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A min-heap: allocations take the lowest free ids, so a sequence's blocks tend to be
        # ascending runs, which KV transfer moves as one message per run (not per block).
        self._free: list[int] = list(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self.prefix_cache = prefix_cache

    @property
    def num_free(self) -> int:
        """Blocks nobody references: the free list plus parked (evictable) cached blocks."""
        return len(self._free) + (self.prefix_cache.num_parked if self.prefix_cache else 0)

    def is_free(self, block_id: int) -> bool:
        return self._ref_counts[block_id] == 0

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes `num_blocks` blocks off the free list, evicting parked cached blocks once it
        is empty (reference count 1 each)."""
        if num_blocks > self.num_free:
            raise NoCapacity(needed_blocks=num_blocks, free_blocks=self.num_free)
        block_ids = [heapq.heappop(self._free) if self._free else self.prefix_cache.evict()
                     for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        """One more owner for each block: referenced, or parked in the prefix cache."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                if not (self.prefix_cache and self.prefix_cache.is_parked(block_id)):
                    raise ValueError(f"block {block_id} is free; only referenced or cached "
                                     "blocks are shared")
                self.prefix_cache.revive(block_id)
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference per block; blocks reaching 0 go back to the free list, or are
        parked if cached (a table's tail first, so its tail is evicted first).

        The next allocation takes the lowest free ids again, whatever the order freed.
        """
        for block_id in reversed(block_ids):
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} freed twice")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0 and not (
                    self.prefix_cache and self.prefix_cache.park(block_id)):
                heapq.heappush(self._free, block_id)

    def extra_blocks(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks a table must add to cover `num_tokens` slots (0 if it already does)."""
        return max(blocks_for(num_tokens, self.block_size) - len(block_table), 0)

    def can_append_slots(self, block_table: list[int], num_tokens: int) -> bool:
        return self.can_allocate(self.extra_blocks(block_table, num_tokens))

    def append_slots(self, block_table: list[int], num_tokens: int) -> None:
        """Appends blocks to `block_table` in place until it covers `num_tokens` slots.

        Appending k speculative slots is `append_slots(table, num_tokens + k)`. All or nothing:
        raises NoCapacity and leaves the table unchanged if the pool is short.
        """
        block_table.extend(self.allocate(self.extra_blocks(block_table, num_tokens)))

    def rollback_slots(self, block_table: list[int], num_tokens: int) -> None:
        """Frees trailing blocks not needed for `num_tokens` slots (speculative rollback)."""
        keep = blocks_for(num_tokens, self.block_size)
        if keep < len(block_table):
            self.free(block_table[keep:])
            del block_table[keep:]

    def release(self, block_table: list[int]) -> None:
        """Frees every block of a table and empties it."""
        self.free(block_table)
        block_table.clear()
