"""Cache-aware routing: workers publish KV events in their polls, the router's KV index
learns who holds which blocks, and `cache_aware` sends a repeated prefix to the worker that
holds it (load still counts); the index forgets a lost worker; a request whose uncached part
is short is prefilled on the decode worker holding the rest (conditional disaggregation)."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.kv_index import MemoryKvIndex
from router.policies import CacheAware, WorkerLoad, make_policy
from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import LocalHandle
from tests.cluster.helpers import ChunkCollector, prompts, request
from tests.cluster.test_disaggregated_workers import make_spec
from workers.actors.colocated_worker import ColocatedWorker
from workers.engine.prefix_cache import block_hashes, cache_root

BLOCK = 8


def test_cache_aware_policy_weighs_cached_tokens_against_load():
    policy = make_policy("cache_aware")
    assert isinstance(policy, CacheAware) and policy.uses_kv_index
    idle = WorkerLoad("idle", outstanding_tokens=0, free_blocks=50)
    holder = WorkerLoad("holder", outstanding_tokens=100, free_blocks=50, cached_tokens=160)
    assert policy.order([idle, holder], 4) == ["holder", "idle"]
    busy_holder = WorkerLoad("holder", outstanding_tokens=900, free_blocks=50,
                             cached_tokens=160)
    assert policy.order([idle, busy_holder], 4) == ["idle", "holder"]
    full_holder = WorkerLoad("holder", outstanding_tokens=0, free_blocks=2, cached_tokens=160)
    assert policy.order([idle, full_holder], 4) == ["idle", "holder"]
    # Nobody holds anything: least tokens.
    assert policy.order([WorkerLoad("a", 300, free_blocks=9), WorkerLoad("b", 10,
                                                                          free_blocks=9)],
                        4) == ["b", "a"]


def test_memory_index_counts_leading_blocks_per_worker_and_forgets_on_reset_and_drop():
    root = cache_root("tiny", "float32", 4)
    tokens = list(range(4, 24))  # 5 blocks of 4
    names = block_hashes(root, tokens, 4)
    index = MemoryKvIndex()
    index.apply("w0", {"root": root.hex(), "reset": False,
                       "events": [["stored", n] for n in names[:3]]})
    index.apply("w1", {"root": root.hex(), "reset": False,
                       "events": [["stored", n] for n in names]})
    index.apply("w1", {"root": root.hex(), "reset": False, "events": [["removed", names[1]]]})
    assert index.overlap(tokens, 4, ["w0", "w1", "w2"]) == {"w0": 3, "w1": 1}
    assert index.num_events_applied == 9
    index.apply("w0", {"root": root.hex(), "reset": True, "events": [["stored", names[0]]]})
    index.drop_worker("w1")
    assert index.overlap(tokens, 4, ["w0", "w1"]) == {"w0": 1}


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()


async def route_one_by_one(core: RouterCore, collector: ChunkCollector, reqs) -> list[str]:
    """Submits each request after the last finished and its KV events reached the router;
    returns the worker each ran on."""
    placed = []
    for req in reqs:
        await core.submit(req)
        await asyncio.to_thread(collector.wait_finished, [req.request_id], 60)
        placed.append(collector.final(req.request_id).worker_id)
        deadline = time.monotonic() + 5
        while core.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a poll or two: the blocks it stored are in the index
    return placed


def test_repeated_prefixes_go_to_the_worker_that_holds_them(tiny_model_dir, collector):
    workers = [ColocatedWorker(make_spec(tiny_model_dir, f"w{i}", "inproc")) for i in range(2)]
    try:
        vocab = workers[0].ready()["vocab_size"]
        systems = prompts(2, vocab, seed=11, low=40, high=41)
        pattern = [0, 1, 1, 1, 0, 0, 1, 0]  # not what round-robin would give
        reqs = [request(f"r{i}", systems[p] + [100 + i, 200 + i], collector.address, 2)
                for i, p in enumerate(pattern)]

        async def run() -> tuple[list[str], dict]:
            core = RouterCore(RouterConfig(block_size=BLOCK, poll_interval_s=0.05,
                                           colocated_policy="cache_aware"))
            for worker in workers:
                core.add_worker(worker.worker_id, "colocated", LocalHandle(worker))
            await core.wait_ready(10)
            core.start()
            placed = await route_one_by_one(core, collector, reqs)
            health = core.health()
            await core.stop()
            return placed, health

        placed, health = asyncio.run(run())
        # The first two prompts (two different prefixes) spread by load; every later one goes
        # where its prefix is cached.
        assert placed[0] != placed[1]
        assert placed[2:] == [placed[p] for p in pattern[2:]]
        assert health["control_plane"]["kv_events_applied"] > 0
        hits = [w.prefix_cache_stats()["hits"] for w in workers]
        assert sum(hits) >= 6 * (len(systems[0]) // BLOCK) * BLOCK
    finally:
        for worker in workers:
            worker.shutdown()
