"""PrefixCache with BlockPool: named blocks are parked (free, evictable) when their last
reader goes, revived by a match, evicted least recently parked first and only when the free
list is empty; a referenced block is never evicted; every store and eviction is an event."""

from __future__ import annotations

import random

import pytest

from workers.engine.block_pool import BlockPool
from workers.engine.prefix_cache import (
    KvEvent,
    PrefixCache,
    block_hashes,
    cache_root,
    chain_hash,
)

ROOT = cache_root("tiny", "float32", 4)


def cached_pool(num_blocks: int = 8) -> BlockPool:
    return BlockPool(num_blocks, block_size=4, prefix_cache=PrefixCache(ROOT))


def test_names_chain_through_every_earlier_block_and_the_root():
    tokens = list(range(4, 14))  # two full blocks and a partial one
    names = block_hashes(ROOT, tokens, 4)
    assert len(names) == 2 and names[0] == chain_hash(ROOT, tokens[:4])
    assert names[1] == chain_hash(names[0], tokens[4:8])
    assert block_hashes(ROOT, tokens[4:8], 4, parent=names[0]) == names[1:]
    # Same tokens under another dtype (or model, or block size) are other blocks.
    assert block_hashes(cache_root("tiny", "float16", 4), tokens, 4)[0] != names[0]
    assert block_hashes(ROOT, [9, 5, 6, 7, 8, 9, 10, 11], 4)[1] != names[1]


def test_a_freed_named_block_stays_cached_counts_free_and_is_revived_by_share():
    pool = cached_pool()
    cache = pool.prefix_cache
    (a, b) = pool.allocate(2)
    names = block_hashes(ROOT, list(range(8)), 4)
    cache.register(a, names[0])
    pool.free([a, b])
    assert pool.num_free == 8 and pool.is_free(a) and cache.num_parked == 1
    assert cache.match(names) == [a]
    pool.share([a])
    assert pool.num_free == 7 and not pool.is_free(a) and cache.num_parked == 0
    with pytest.raises(ValueError):
        pool.share([b])  # unnamed and free: nothing to share
    pool.free([a])
    assert pool.num_free == 8


def test_eviction_only_when_the_free_list_is_empty_least_recently_parked_first():
    pool = cached_pool(num_blocks=4)
    cache = pool.prefix_cache
    ids = pool.allocate(3)
    names = block_hashes(ROOT, list(range(12)), 4)
    for block_id, name in zip(ids, names, strict=True):
        cache.register(block_id, name)
    cache.drain_events()
    pool.free([ids[0]])
    pool.free([ids[2], ids[1]])  # parked: ids[0], then ids[1], then ids[2]
    (fresh,) = pool.allocate(1)
    assert fresh not in ids and cache.num_parked == 3  # the unnamed free block goes first
    assert pool.allocate(2) == [ids[0], ids[1]]
    assert cache.match(names) == [] and cache.match(names[2:]) == [ids[2]]
    assert cache.drain_events().events == [KvEvent("removed", names[0]),
                                           KvEvent("removed", names[1])]


def test_a_referenced_cached_block_is_never_evicted():
    pool = cached_pool(num_blocks=4)
    cache = pool.prefix_cache
    (held,) = pool.allocate(1)
    cache.register(held, block_hashes(ROOT, [1, 2, 3, 4], 4)[0])
    pool.share([held])  # two readers
    pool.free([held])  # one left
    assert pool.num_free == 3
    others = pool.allocate(3)
    assert held not in others and not pool.is_free(held)
    assert not pool.can_allocate(1)
    pool.free(others)
    pool.free([held])
    assert pool.num_free == 4 and cache.num_parked == 1


def test_a_name_already_held_keeps_its_block_and_the_copy_is_freed():
    pool = cached_pool()
    cache = pool.prefix_cache
    first, copy = pool.allocate(2)
    name = block_hashes(ROOT, [1, 2, 3, 4], 4)[0]
    cache.register(first, name)
    cache.register(copy, name)
    pool.free([first, copy])
    assert cache.match([name]) == [first] and cache.num_parked == 1
    assert [e.kind for e in cache.drain_events().events] == ["stored"]


def test_events_overflow_becomes_a_reset_with_a_snapshot(monkeypatch):
    monkeypatch.setattr("workers.engine.prefix_cache._MAX_PENDING_EVENTS", 3)
    pool = cached_pool()
    cache = pool.prefix_cache
    ids = pool.allocate(5)
    names = block_hashes(ROOT, list(range(20)), 4)
    for block_id, name in zip(ids, names, strict=True):
        cache.register(block_id, name)
    drained = cache.drain_events()
    assert drained.reset and {e.block_hash for e in drained.events} == set(names)
    assert cache.drain_events() == type(drained)([])
    pool.free(ids)


def test_random_shares_and_frees_never_free_a_held_block_and_end_all_free():
    """Sequences of random prompts from a few shared prefixes take their cached prefix, grow
    and register blocks, and go in random order; at every point a block some table holds is
    referenced (never free, never evicted), and at the end every block is free."""
    rng = random.Random(3)
    pool = cached_pool(num_blocks=24)
    cache = pool.prefix_cache
    prefixes = [[rng.randrange(4, 50) for _ in range(rng.randint(2, 14))] for _ in range(3)]
    tables: list[list[int]] = []
    for _ in range(300):
        if tables and (rng.random() < 0.45 or pool.num_free < 6):
            pool.release(tables.pop(rng.randrange(len(tables))))
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(4, 50) for _ in range(rng.randint(1, 9))]
            names = block_hashes(ROOT, tokens, 4)
            table = cache.match(names)
            pool.share(table)
            pool.append_slots(table, len(tokens))
            for i, name in enumerate(names):
                cache.register(table[i], name)
            tables.append(table)
        held = [b for t in tables for b in t]
        assert not any(pool.is_free(b) or cache.is_parked(b) for b in held)
        assert pool.num_free == 24 - len(set(held))
    for table in tables:
        pool.release(table)
    assert pool.num_free == 24 and all(pool.is_free(b) for b in range(24))
