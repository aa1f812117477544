"""A TP 2 decode worker fed by single-rank prefill workers loses one rank mid-stream: the
whole decode worker goes, its request ends with a clear error within 5 s, Ray restarts the
group (fresh receivers on every rank: a new group address), the router admits it again and
introduces it to the prefill workers, and the next request's KV moves rank to rank into the
new ranks, token-exact, with every block free."""

from __future__ import annotations

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
from workers.kv_transfer.rank_routes import GroupAddress

BLOCK = 8


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    yield from tiny_ray_cluster(tiny_model_dir, "pdrankfail", num_decode=1, num_blocks=64,
                                block=BLOCK, max_worker_restarts=2, max_migrations=0,
                                decode_tp=2)


def test_decode_rank_killed_mid_stream_then_the_new_group_receives_rank_to_rank(
    cluster, tiny_model_dir, hf_reference
):
    collector = ChunkCollector()
    try:
        _kill_a_rank_then_serve(cluster, collector, tiny_model_dir, hf_reference)
    finally:
        collector.close()


def _kill_a_rank_then_serve(cluster, collector, tiny_model_dir, hf_reference) -> None:
    ranks = cluster.call("decode-0", "ready")["ranks"]
    old_address = GroupAddress.parse(cluster.call("decode-0", "kv_address"))
    assert len(old_address.addresses) == 2
    final, told = kill_rank_mid_stream(cluster, collector, ranks)
    assert final.finish_reason == "error" and final.error_type == "WorkerLost", final
    wait_readmitted(cluster, "decode-0")
    new_address = GroupAddress.parse(cluster.call("decode-0", "kv_address"))
    assert set(new_address.addresses).isdisjoint(old_address.addresses)
    model = hf_reference(tiny_model_dir)
    prompts = {f"after-{i}": [9, 8, 7, 6, 5, i + 10] * (i + 1) for i in range(4)}
    for rid, prompt in prompts.items():
        ray.get(cluster.router.submit.remote(request(rid, prompt, collector.address, 6)))
    collector.wait_finished(list(prompts))
    for rid, prompt in prompts.items():
        assert collector.tokens(rid) == hf_greedy(model, prompt, 6), rid
    wait_until(lambda: all_blocks_free(cluster), 5, "blocks free after the restart")
    print(f"client told {told:.2f} s after the rank was killed")
