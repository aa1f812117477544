"""A TP 2 colocated worker on Ray loses one rank mid-stream: the whole worker goes (never half
alive), its request ends with a clear error within 5 s, Ray restarts the group (the driver
rank builds fresh ranks in the same placement group), the router admits it again, and it
serves token-exact with every block free."""

from __future__ import annotations

import os

import pytest
import ray

from tests.cluster.helpers import (
    ChunkCollector,
    all_blocks_free,
    hf_greedy,
    kill_rank_mid_stream,
    request,
    tiny_ray_cluster,
    wait_readmitted,
    wait_until,
)

BLOCK = 8


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    yield from tiny_ray_cluster(tiny_model_dir, "rankfail", num_decode=1, num_blocks=64,
                                block=BLOCK, max_worker_restarts=2, max_migrations=0,
                                num_colocated=1, tp=2)


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()



def worker_ranks(cluster) -> list[dict]:
    return cluster.call("colocated-0", "ready")["ranks"]


def test_rank_killed_mid_stream_takes_the_worker_out_then_it_is_readmitted(
    cluster, collector, tiny_model_dir, hf_reference
):
    ranks = worker_ranks(cluster)
    final, told = kill_rank_mid_stream(cluster, collector, ranks)
    assert final.finish_reason == "error" and final.error_type == "WorkerLost", final
    assert "colocated-0" in final.error
    wait_until(lambda: not _alive(ranks[0]["pid"]), 10, "the driver rank exits with its group")
    wait_readmitted(cluster, "colocated-0")
    fresh = worker_ranks(cluster)
    assert {r["pid"] for r in fresh}.isdisjoint(r["pid"] for r in ranks)
    prompt = [9, 8, 7, 6, 5]
    ray.get(cluster.router.submit.remote(request("after", prompt, collector.address, 5)))
    collector.wait_finished(["after"])
    assert collector.tokens("after") == hf_greedy(hf_reference(tiny_model_dir), prompt, 5)
    wait_until(lambda: all_blocks_free(cluster), 5, "blocks free after the restart")
    print(f"client told {told:.2f} s after the rank was killed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
