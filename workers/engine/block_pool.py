"""The KV block pool: pure CPU bookkeeping of which cache blocks are free (nano-vllm style).

A block id is an index on axis 0 of every layer's K/V cache. The pool keeps a free list and
a reference count per block; a sequence's blocks are its `block_table`, grown as its tokens
get KV and shrunk when speculative slots are rolled back.

Seams left for later (not implemented now):
- Prefix caching: full blocks will be named by `chain_hash(parent_hash, token_ids)`;
  `share` bumps a block's reference count so several sequences can point at it, and a freed
  cached block would stay out of the free list until evicted (LRU).
- Speculative decoding: `append_slots` to num_tokens + k before verification, then
  `rollback_slots` to the accepted length; the pair leaves the free count as it was.
"""

from __future__ import annotations

import hashlib
import heapq

from workers.errors import NoCapacity


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` slots."""
    return -(-num_tokens // block_size)


def chain_hash(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Identity of a full block: its tokens and, through the parent, every earlier block."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent_hash or b"")
    digest.update(b",".join(str(t).encode() for t in token_ids))
    return digest.digest()


class BlockPool:
    """Free list plus reference counts over `num_blocks` blocks of `block_size` slots.

    Invariant: a block is in the free list iff its reference count is 0; `num_free` plus the
    number of referenced blocks is always `num_blocks`.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A min-heap: allocations take the lowest free ids, so a sequence's blocks tend to be
        # ascending runs, which KV transfer moves as one message per run (not per block).
        self._free: list[int] = list(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, block_id: int) -> bool:
        return self._ref_counts[block_id] == 0

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes `num_blocks` blocks off the free list (reference count 1 each)."""
        if num_blocks > len(self._free):
            raise NoCapacity(needed_blocks=num_blocks, free_blocks=len(self._free))
        block_ids = [heapq.heappop(self._free) for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        """One more owner for each block (prefix caching seam)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is free; only referenced blocks are shared")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference per block; blocks reaching 0 go back to the free list.

        The next allocation takes the lowest free ids again, whatever the order freed.
        """
        for block_id in reversed(block_ids):
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} freed twice")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
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
