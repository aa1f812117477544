"""ColocatedWorker in-process: greedy output over a real ZMQ socket equals transformers', and
aborts free every block; RouterCore places requests on it through in-process handles."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import LocalHandle
from tests.cluster.helpers import ChunkCollector, hf_greedy, prompts, request
from workers.actors.colocated_worker import ColocatedWorker
from workers.actors.worker_base import WorkerSpec
from workers.config import CacheConfig, EngineConfig
from workers.protocol import LetGo


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    spec = WorkerSpec("colocated-0", EngineConfig(model=str(tiny_model_dir), seed=0,
                                                  cache=CacheConfig(block_size=8, num_blocks=64)))
    worker = ColocatedWorker(spec)
    yield worker
    worker.shutdown()


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()



def test_greedy_stream_matches_transformers(worker, collector, tiny_model_dir, hf_reference):
    vocab = worker.ready()["vocab_size"]
    batch = prompts(4, vocab, seed=1)
    for i, prompt in enumerate(batch):
        worker.submit(request(f"r{i}", prompt, collector.address))
    ids = [f"r{i}" for i in range(len(batch))]
    collector.wait_finished(ids)
    model = hf_reference(tiny_model_dir)
    for rid, prompt in zip(ids, batch, strict=True):
        assert collector.tokens(rid) == hf_greedy(model, prompt, 6), rid
        final = collector.final(rid)
        assert final.finish_reason == "length" and final.num_output_tokens == 6
    assert worker.free_blocks() == worker.ready()["total_blocks"]


def test_bad_prompt_ends_with_typed_error_chunk(worker, collector):
    worker.submit(request("bad", [10**9], collector.address))
    collector.wait_finished(["bad"])
    final = collector.final("bad")
    assert final.finish_reason == "error" and final.error_type == "UnknownTokenIds"


def test_router_core_places_and_aborts_on_local_workers(worker, collector):
    async def scenario() -> None:
        core = RouterCore(RouterConfig(block_size=8, poll_interval_s=0.05))
        core.add_worker("colocated-0", "colocated", LocalHandle(worker))
        await core.wait_ready(5)
        core.start()
        await core.submit(request("long", [5] * 10, collector.address, max_tokens=200))
        collector.wait_tokens("long", 2)
        await core.abort("long")
        collector.wait_finished(["long"], timeout_s=5)
        final = collector.final("long")
        # The worker that streamed writes the router's final chunk, behind its last token.
        assert final.finish_reason == "abort" and final.worker_id == "colocated-0"
        assert collector.chunks["long"][-1] is final
        await core.submit(request("short", [5] * 10, collector.address, max_tokens=3))
        collector.wait_finished(["short"])
        deadline = time.monotonic() + 5
        while core.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not core.requests  # the worker's news said 'short' finished
        await core.stop()

    asyncio.run(scenario())
    assert worker.free_blocks() == worker.ready()["total_blocks"]


def test_abort_answers_how_far_the_worker_streamed(worker, collector):
    worker.submit(request("done", [6] * 10, collector.address, max_tokens=3))
    collector.wait_finished(["done"])
    assert worker.abort("done") == LetGo(last_index=2, ended=True)  # its own final is out


def test_a_placement_that_comes_after_its_abort_is_refused(worker, collector):
    """Ray does not order a threaded actor's calls: the router's abort can reach a worker
    before the placement it aborts. The worker remembers it: the placement is refused, and
    nothing of it is streamed or held."""
    assert worker.abort("late") == LetGo(last_index=-1, ended=False)
    worker.submit(request("late", [5] * 10, collector.address, max_tokens=50))
    worker.submit(request("after", [5] * 10, collector.address, max_tokens=2))
    collector.wait_finished(["after"])
    assert "late" not in collector.chunks
    assert worker.free_blocks() == worker.ready()["total_blocks"]


def test_two_routers_checking_one_worker_each_learn_how_their_requests_end(worker, collector):
    """A worker pushes its news to every router that checks it; each router takes the news
    of its own requests (and forgets them when they finish)."""

    async def scenario() -> list[int]:
        cores = [RouterCore(RouterConfig(block_size=8, poll_interval_s=0.05)) for _ in "ab"]
        for core in cores:
            core.add_worker("colocated-0", "colocated", LocalHandle(worker))
            await core.wait_ready(5)
            core.start()
        for i, core in enumerate(cores):
            await core.submit(request(f"two-{i}", [5] * 8, collector.address, max_tokens=3))
        await asyncio.to_thread(collector.wait_finished, ["two-0", "two-1"])
        deadline = time.monotonic() + 5
        while any(core.requests for core in cores) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        finished = [core.num_finished for core in cores]
        for core in cores:
            await core.stop()
        return finished

    assert asyncio.run(scenario()) == [1, 1]
