"""A real Ray cluster (2 prefill + 1 decode actors, the Router actor) with outputs on a real
ZMQ socket, migration off (`--no-migration`; tests/cluster/test_ray_migration.py has it on):
aborts at every phase free every block within 5 s; a decode worker killed mid-stream ends its
request with a clear error; a prefill worker killed with requests on it has each of them
either completed exactly (its KV had landed) or cleanly failed; Ray's restarted workers are
admitted again, and a restarted Router serves again."""

from __future__ import annotations

import time

import pytest
import ray

from router.worker_handle import raise_typed
from tests.cluster.helpers import (
    ChunkCollector,
    all_blocks_free,
    hf_greedy,
    kill_and_wait_restarted,
    prompts,
    request,
    tiny_ray_cluster,
    wait_all_ready,
    wait_readmitted,
    wait_until,
)
from workers.errors import NoReadyWorker
from workers.protocol import GenerateRequest

BLOCK = 8


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    yield from tiny_ray_cluster(tiny_model_dir, "failover", num_decode=1, num_blocks=512,
                                block=BLOCK, max_worker_restarts=2, max_migrations=0)


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()


def submit(cluster, req: GenerateRequest) -> None:
    """router.submit, with a refusal raised as its typed error (as the gateway sees it)."""
    try:
        ray.get(cluster.router.submit.remote(req))
    except ray.exceptions.RayTaskError as exc:
        raise_typed(exc, "router")



def test_aborts_at_every_phase_free_all_blocks(cluster, collector):
    vocab = cluster.infos["prefill-0"]["vocab_size"]
    batch = prompts(12, vocab, seed=5, low=20, high=60)
    ids = []
    for i, prompt in enumerate(batch):
        rid = f"abort-{i}"
        # Long enough that none can finish before its abort, even on a fast idle machine (300
        # tokens once did, in under 0.4 s): ~2.5 s of decode at ~1.3 ms per token.
        ray.get(cluster.router.submit.remote(request(rid, prompt, collector.address, 1900)))
        ids.append(rid)
        # Staggered aborts catch requests reserving, prefilling/transferring and decoding.
        time.sleep((0.0, 0.01, 0.03, 0.1, 0.25, 0.4)[i % 6])
        ray.get(cluster.router.abort.remote(rid))
    collector.wait_finished(ids, timeout_s=5)
    for rid in ids:
        assert collector.final(rid).finish_reason == "abort"
        assert collector.chunks[rid][-1].finished, f"{rid}: a chunk after its final one"
    took = wait_until(lambda: all_blocks_free(cluster), 5, "blocks free after aborts")
    stats = ray.get(cluster.router.stats.remote())
    assert stats["in_flight"] == 0
    assert sum(stats["aborted_in_phase"].values()) == len(ids), stats
    # Before the KV landed (prefilling, or transferring once token 1 is out) and after.
    phases = set(stats["aborted_in_phase"])
    assert "decoding" in phases and {"prefilling", "transferring"} & phases, stats
    print(f"blocks free {took:.2f} s after the last abort; phases {stats['aborted_in_phase']}")


def test_killed_decode_worker_mid_stream_fails_clearly_then_is_readmitted(
    cluster, collector, tiny_model_dir, hf_reference
):
    router = cluster.router
    ray.get(router.submit.remote(request("doomed", [7] * 12, collector.address, 400)))
    collector.wait_tokens("doomed", 3)
    killed_at = time.monotonic()
    ray.kill(cluster.workers["decode-0"], no_restart=False)
    collector.wait_finished(["doomed"], timeout_s=5)
    final = collector.final("doomed")
    assert final.finish_reason == "error" and final.error_type == "WorkerLost"
    assert "decode-0" in final.error and not collector.resumes
    print(f"client told {time.monotonic() - killed_at:.2f} s after the kill")
    with pytest.raises(NoReadyWorker):
        submit(cluster, request("no-decode", [5] * 4, collector.address, 2))
    wait_readmitted(cluster, "decode-0")
    prompt = [9, 8, 7, 6, 5]
    ray.get(router.submit.remote(request("after", prompt, collector.address, 5)))
    collector.wait_finished(["after"])
    assert collector.tokens("after") == hf_greedy(hf_reference(tiny_model_dir), prompt, 5)
    wait_until(lambda: all_blocks_free(cluster), 5, "blocks free after restart")


def test_killed_prefill_worker_requests_complete_or_fail_within_5s(
    cluster, collector, tiny_model_dir, hf_reference
):
    wait_all_ready(cluster)
    vocab = cluster.infos["prefill-0"]["vocab_size"]
    batch = prompts(8, vocab, seed=9, low=30, high=60)
    ids = [f"p-{i}" for i in range(len(batch))]
    for rid, prompt in zip(ids, batch, strict=True):
        ray.get(cluster.router.submit.remote(request(rid, prompt, collector.address, 4)))
    ray.kill(cluster.workers["prefill-0"], no_restart=False)
    collector.wait_finished(ids, timeout_s=5)
    model = hf_reference(tiny_model_dir)
    completed = 0
    for rid, prompt in zip(ids, batch, strict=True):
        final = collector.final(rid)
        if final.finish_reason == "error":
            assert final.error_type == "WorkerLost" and "prefill-0" in final.error
        else:
            assert collector.tokens(rid) == hf_greedy(model, prompt, 4)
            completed += 1
    print(f"{completed}/{len(ids)} completed, stats {ray.get(cluster.router.stats.remote())}")
    wait_readmitted(cluster, "prefill-0")
    wait_until(lambda: all_blocks_free(cluster), 5, "blocks free after prefill restart")
    # The restarted prefill worker takes requests again (least-tokens rotates between the two).
    after = [f"again-{i}" for i in range(4)]
    for rid, prompt in zip(after, batch, strict=False):
        submit(cluster, request(rid, prompt, collector.address, 3))
    collector.wait_finished(after)
    assert {collector.chunks[rid][0].worker_id for rid in after} == {"prefill-0", "prefill-1"}
    for rid, prompt in zip(after, batch, strict=False):
        assert collector.tokens(rid) == hf_greedy(model, prompt, 3)


def test_restarted_router_serves_again(cluster, collector, tiny_model_dir, hf_reference):
    kill_and_wait_restarted(cluster.router)
    prompt = [4, 5, 6, 7]
    attempts = iter(range(1000))
    served: list[str] = []

    def serves() -> bool:
        # A fresh id per attempt: a refused attempt may still have reached a worker while the
        # new router incarnation was admitting them, and must not collide with the next one.
        request_id = f"via-new-router-{next(attempts)}"
        try:
            submit(cluster, request(request_id, prompt, collector.address, 3))
        except (ray.exceptions.RayActorError, NoReadyWorker):
            return False
        served.append(request_id)
        return True

    took = wait_until(serves, 60, "the restarted router taking a request")
    collector.wait_finished(served)
    assert collector.tokens(served[0]) == hf_greedy(hf_reference(tiny_model_dir), prompt, 3)
    print(f"router back after {took:.1f} s")
