"""BlockPool: free list, reference counts, append and roll back slots, no leaks."""

from __future__ import annotations

import pytest

from workers.engine.block_pool import BlockPool, blocks_for
from workers.engine.prefix_cache import chain_hash
from workers.errors import NoCapacity


def test_allocate_and_free_restore_every_block():
    pool = BlockPool(num_blocks=8, block_size=4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert pool.num_free == 0
    assert len(set(a + b)) == 8
    assert not pool.can_allocate(1)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 8
    assert all(pool.is_free(i) for i in range(8))


def test_allocate_beyond_free_raises_no_capacity_with_numbers():
    pool = BlockPool(num_blocks=4, block_size=4)
    pool.allocate(3)
    with pytest.raises(NoCapacity) as err:
        pool.allocate(2)
    assert (err.value.needed_blocks, err.value.free_blocks) == (2, 1)
    assert pool.num_free == 1


def test_double_free_is_refused():
    pool = BlockPool(num_blocks=2, block_size=4)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(ValueError):
        pool.free(ids)


def test_shared_block_returns_only_after_last_owner_frees():
    pool = BlockPool(num_blocks=3, block_size=2)
    ids = pool.allocate(1)
    pool.share(ids)
    pool.free(ids)
    assert pool.num_free == 2 and not pool.is_free(ids[0])
    pool.free(ids)
    assert pool.num_free == 3


def test_append_slots_covers_tokens_and_is_all_or_nothing():
    pool = BlockPool(num_blocks=4, block_size=4)
    table: list[int] = []
    pool.append_slots(table, 5)
    assert len(table) == 2
    pool.append_slots(table, 8)  # still fits in 2 blocks
    assert len(table) == 2
    with pytest.raises(NoCapacity):
        pool.append_slots(table, 17)  # needs 5 blocks, pool has 4
    assert len(table) == 2 and pool.num_free == 2


def test_append_k_speculative_slots_then_roll_back():
    pool = BlockPool(num_blocks=10, block_size=4)
    table: list[int] = []
    pool.append_slots(table, 7)
    before = (list(table), pool.num_free)
    pool.append_slots(table, 7 + 6)  # 6 speculative slots cross into 2 new blocks
    assert len(table) == 4
    pool.rollback_slots(table, 7 + 1)  # one accepted token: back to 2 blocks
    assert (table, pool.num_free) == before
    pool.release(table)
    assert table == [] and pool.num_free == 10


def test_blocks_for_and_chain_hash_depend_on_parent():
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    h1 = chain_hash(None, [1, 2, 3, 4])
    assert chain_hash(h1, [5, 6]) != chain_hash(chain_hash(None, [9, 2, 3, 4]), [5, 6])
    assert chain_hash(h1, [5, 6]) == chain_hash(chain_hash(None, [1, 2, 3, 4]), [5, 6])
