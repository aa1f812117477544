"""Prefix caching: full KV blocks named by a hash chain, kept after their last reader is gone.

Pure bookkeeping (no torch), used by `BlockPool` and the scheduler. A full block of
`block_size` tokens is named by `chain_hash(parent, tokens)`, the parent being the previous
block's name or, for block 0, the cache's `root` (model, dtype, block size: anything that
changes KV for the same tokens). Equal names mean equal KV, so a new sequence whose leading
blocks are named here shares them (reference counts in the pool) instead of computing them.

A named block's life: registered once its KV is computed (the scheduler, after a step); held
while some sequence references it; *parked* (reference count 0, still named, evictable,
counted as free) when the last reader lets go; revived by a sequence that matches it, or
evicted least recently parked first when the pool runs out of unnamed free blocks.

Every registration and eviction is queued as a `KvEvent` for cache-aware routing (the
worker drains them into its poll; the router keeps an index of who holds what).

Only blocks whose every token is computed and accepted get a name, so KV written for
speculative tokens and rolled back is never named (the rollback seam stays in the pool).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

_MAX_PENDING_EVENTS = 50_000
"""Undrained events beyond this are dropped for a full snapshot (`drain_events`)."""


def chain_hash(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Identity of a full block: its tokens and, through the parent, every earlier block."""
    return _chain(parent_hash or b"", _token_bytes(token_ids))


_TOKEN_WORD = array("q")


def _token_bytes(token_ids: list[int]) -> bytes:
    """Token ids as int64 machine words: one C-level conversion for a whole prompt (a
    per-token str() join cost ~1 ms of host time for a 2k-token prompt, paid before its
    prefill step launches)."""
    return array(_TOKEN_WORD.typecode, token_ids).tobytes()


def _chain(parent_hash: bytes, block: bytes) -> bytes:
    return hashlib.blake2b(parent_hash + block, digest_size=16).digest()


def cache_root(model: str, dtype: str, block_size: int) -> bytes:
    """Parent of every chain's first block: what besides the tokens makes KV differ."""
    return hashlib.blake2b(f"{model}|{dtype}|{block_size}".encode(), digest_size=16).digest()


def block_hashes(root: bytes, token_ids: list[int], block_size: int,
                 parent: bytes | None = None) -> list[bytes]:
    """Names of the full blocks of `token_ids` (a trailing partial block has none); `parent`:
    the name of the block before them, None when they start at token 0."""
    full = len(token_ids) // block_size
    data = _token_bytes(token_ids[: full * block_size])
    width = _TOKEN_WORD.itemsize * block_size
    hashes: list[bytes] = []
    previous = parent or root
    for i in range(full):
        previous = _chain(previous, data[i * width:(i + 1) * width])
        hashes.append(previous)
    return hashes


@dataclass(frozen=True)
class KvEvent:
    """A block name this worker now holds ('stored') or no longer holds ('removed')."""

    kind: str
    block_hash: bytes


@dataclass(frozen=True)
class KvEvents:
    """What `drain_events` hands the worker: with `reset`, forget everything known of this
    worker first (events were dropped; `events` then lists every name it holds)."""

    events: list[KvEvent]
    reset: bool = False


class PrefixCache:
    """name <-> block id for named blocks, plus the LRU of parked ones. See the module doc."""

    def __init__(self, root: bytes):
        self.root = root
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._parked: OrderedDict[int, None] = OrderedDict()
        """Named blocks nobody references, least recently parked first."""
        self._events: list[KvEvent] = []
        self._reset = False
        self.num_queries = 0
        """Tokens looked up (vLLM's prefix_cache_queries)."""
        self.num_hits = 0
        """Tokens found (vLLM's prefix_cache_hits)."""

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    @property
    def num_named(self) -> int:
        return len(self._block_of)

    def match(self, hashes: list[bytes]) -> list[int]:
        """Block ids of the longest run of leading `hashes` named here."""
        found = []
        for block_hash in hashes:
            block_id = self._block_of.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def count_lookup(self, num_queried: int, num_hit: int) -> None:
        self.num_queries += num_queried
        self.num_hits += num_hit

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Names a referenced block whose KV is computed. A name already held by another
        block keeps that one (this copy stays unnamed and is freed as usual)."""
        if block_hash in self._block_of or block_id in self._hash_of:
            return
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        self._emit(KvEvent("stored", block_hash))

    def park(self, block_id: int) -> bool:
        """The last reference to `block_id` is gone: keeps it if named (True), else False
        (the pool frees it)."""
        if block_id not in self._hash_of:
            return False
        self._parked[block_id] = None
        return True

    def is_parked(self, block_id: int) -> bool:
        return block_id in self._parked

    def revive(self, block_id: int) -> None:
        """A parked block is referenced again."""
        del self._parked[block_id]

    def evict(self) -> int | None:
        """Unnames the least recently parked block and returns its id (None: none parked)."""
        if not self._parked:
            return None
        block_id, _ = self._parked.popitem(last=False)
        block_hash = self._hash_of.pop(block_id)
        del self._block_of[block_hash]
        self._emit(KvEvent("removed", block_hash))
        return block_id

    def drain_events(self) -> KvEvents:
        """Events since the last drain (for the worker's poll)."""
        if self._reset:
            self._reset, self._events = False, []
            return KvEvents([KvEvent("stored", h) for h in self._block_of], reset=True)
        events, self._events = self._events, []
        return KvEvents(events)

    def request_snapshot(self) -> None:
        """The next drain lists every name held, with reset (a router lost its index)."""
        self._reset, self._events = True, []

    def _emit(self, event: KvEvent) -> None:
        if self._reset:
            return
        if len(self._events) >= _MAX_PENDING_EVENTS:
            self._reset, self._events = True, []
            return
        self._events.append(event)
