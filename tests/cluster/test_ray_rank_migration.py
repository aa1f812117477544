"""Two colocated TP 2 workers on Ray, migration on (the default): a rank of one worker killed
with -9 mid-stream takes that whole worker out, and every stream it served continues on the
other worker token-exact against transformers, as one stream (no duplicate, no gap, one final
chunk), stalled less than 5 s; the group is restarted and admitted again; every block is free
afterwards. (tests/cluster/test_ray_rank_failure.py: migration off, the request ends with a
clear WorkerLost.)"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from tests.cluster.helpers import (
    GatewayStreams,
    all_blocks_free,
    hf_greedy,
    incarnation,
    prompts,
    tiny_ray_cluster,
    wait_readmitted,
    wait_until,
)
from workers.engine.sampling_params import SamplingParams
from workers.protocol import GenerateRequest

BLOCK = 8
MAX_STALL_S = 5.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    yield from tiny_ray_cluster(tiny_model_dir, "rankmig", num_decode=1, num_blocks=256,
                                block=BLOCK, max_worker_restarts=2, max_migrations=2,
                                num_colocated=2, tp=2)


def test_rank_killed_mid_stream_its_streams_continue_on_the_other_worker(
    cluster, tiny_model_dir, hf_reference
):
    streams = GatewayStreams(cluster.router)
    try:
        max_tokens = 30
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0)
        batch = prompts(8, cluster.infos["colocated-0"]["vocab_size"], seed=21, low=8, high=40)
        reqs = [GenerateRequest(f"m-{i}", p, params, streams.address, arrival_time=time.time())
                for i, p in enumerate(batch)]
        streams.submit(reqs)
        streams.wait(lambda: all(len(streams.tokens(r.request_id)) >= 3 for r in reqs), 60,
                     "3 tokens of every stream")
        old = incarnation(cluster, "colocated-0")
        doomed = cluster.call("colocated-0", "ready")["ranks"][1]["pid"]
        os.kill(doomed, signal.SIGKILL)
        streams.wait_finished([r.request_id for r in reqs], timeout_s=90)
        model = hf_reference(tiny_model_dir)
        for req in reqs:
            assert streams.final(req.request_id).finish_reason == "length"
            indices = [c.index for c in streams.chunks[req.request_id] if c.new_token_ids]
            assert indices == sorted(set(indices)), indices
            assert streams.tokens(req.request_id) == hf_greedy(model, req.prompt_token_ids,
                                                               max_tokens)
        stats = ray.get(cluster.router.stats.remote())
        assert stats["migrations"] > 0 and stats["migrations_failed"] == 0, stats
        assert max(streams.stalls) < MAX_STALL_S, streams.stalls
        print(f"{stats['migrations']} migrations; stalls "
              f"{[round(s, 2) for s in streams.stalls]} s")
        wait_readmitted(cluster, "colocated-0", old=old)
        wait_until(lambda: all_blocks_free(cluster), 10, "blocks free after the migrations")
    finally:
        streams.close()
