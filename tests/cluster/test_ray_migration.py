"""Failover by migration on a real Ray cluster (2 prefill + 2 decode actors, the Router
actor), with the gateway's real output path (tests/cluster/helpers.GatewayStreams): a worker
killed with -9 mid-stream, and every stream it served continues on a live worker, token-exact
against transformers, as one uninterrupted stream (no duplicate, no gap, one final chunk),
stalled less than 5 s, also through the real HTTP gateway; seeded sampling continues as it
would have; a loss while migrating, or a continuation that never comes, ends the request with
one clear typed error; every block is free afterwards."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
import ray

from cluster.gateway_app import build_app
from tests.cluster.helpers import (
    ChunkCollector,
    GatewayStreams,
    all_blocks_free,
    hf_greedy,
    incarnation,
    prompts,
    tiny_ray_cluster,
    wait_all_ready,
    wait_pairs_ready,
    wait_readmitted,
    wait_until,
)
from tests.e2e.served_cluster import sse_events
from tests.served_app import serve
from workers.engine.sampling_params import SamplingParams
from workers.protocol import GenerateRequest

BLOCK = 8
MAX_STALL_S = 5.0
RESUME_TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    yield from tiny_ray_cluster(tiny_model_dir, "migration", num_decode=2, num_blocks=2048,
                                block=BLOCK, max_worker_restarts=5, max_migrations=2,
                                resume_timeout_s=RESUME_TIMEOUT_S)


@pytest.fixture()
def streams(cluster):
    wait_all_ready(cluster)
    streams = GatewayStreams(cluster.router)
    yield streams
    streams.close()


def requests(address: str, name: str, batch, max_tokens: int, **sampling):
    # min_tokens bans EOS as transformers' min_new_tokens does (hf_greedy).
    params = SamplingParams(**{"max_tokens": max_tokens, "min_tokens": max_tokens,
                               "temperature": 0.0, **sampling})
    return [GenerateRequest(f"{name}-{i}", prompt, params, address, arrival_time=time.time())
            for i, prompt in enumerate(batch)]


def stats(cluster) -> dict:
    return ray.get(cluster.router.stats.remote())


def kill(cluster, worker_id: str) -> str:
    """kill -9 (Ray restarts it); returns the incarnation it had."""
    old = incarnation(cluster, worker_id)
    ray.kill(cluster.workers[worker_id], no_restart=False)
    return old


def kill_busiest(cluster, role: str) -> tuple[str, str, dict[str, int]]:
    """`kill` the worker of `role` ("decode") holding the most of the router's requests just
    before (the lowest id on a tie): the router may have placed every stream on one of the
    two, and a kill of the other would leave nothing to migrate. Returns (worker id, the
    incarnation it had, requests per worker at the kill)."""
    placed = {m["worker_id"]: m.get("num_requests", 0)
              for m in ray.get(cluster.router.worker_metrics.remote())}
    victim = min((w for w in placed if w.startswith(f"{role}-")),
                 key=lambda w: (-placed[w], w))
    return victim, kill(cluster, victim), placed


def assert_exact(streams, reqs, model, max_tokens: int) -> None:
    for req in reqs:
        final = streams.final(req.request_id)
        assert final.finish_reason == "length", (req.request_id, final)
        indices = [c.index for c in streams.chunks[req.request_id] if c.new_token_ids]
        assert indices == sorted(set(indices)), indices  # in order, no duplicate
        trace = [(c.index, c.attempt, c.worker_id) for c in streams.chunks[req.request_id]]
        assert streams.tokens(req.request_id) == hf_greedy(model, req.prompt_token_ids,
                                                           max_tokens), trace


def test_killed_decode_worker_every_stream_continues_token_exact(
    cluster, streams, tiny_model_dir, hf_reference
):
    rng = random.Random(13)
    vocab = cluster.infos["prefill-0"]["vocab_size"]
    max_tokens = 40
    reqs = requests(streams.address, "d", prompts(16, vocab, seed=3, low=16, high=64),
                    max_tokens)
    before = stats(cluster)["migrations"]
    streams.submit(reqs)
    # A random point: once a random stream has a random number of tokens.
    watched, count = rng.choice(reqs).request_id, rng.randint(1, 12)
    streams.wait(lambda: len(streams.tokens(watched)) >= count, 60, "tokens before the kill")
    victim, old, placed = kill_busiest(cluster, "decode")
    streams.wait_finished([r.request_id for r in reqs], timeout_s=90)
    assert_exact(streams, reqs, hf_reference(tiny_model_dir), max_tokens)
    after = stats(cluster)
    assert after["migrations"] > before and after["migrations_failed"] == 0, (victim, placed,
                                                                            after)
    assert max(streams.stalls) < MAX_STALL_S, streams.stalls
    print(f"{after['migrations'] - before} migrations after a kill of {victim} at token "
          f"{count}; stalls {[round(s, 2) for s in streams.stalls]} s; from "
          f"{after['migrated_from_phase']}")
    wait_readmitted(cluster, victim, old=old)
    wait_until(lambda: all_blocks_free(cluster), 10, "blocks free after the migrations")


def test_killed_prefill_worker_every_request_continues_token_exact(
    cluster, streams, tiny_model_dir, hf_reference
):
    """Killed while its requests are before token 1 or have it out with the KV landing; one
    whose KV had landed goes on on its decode worker, the others migrate."""
    vocab = cluster.infos["prefill-0"]["vocab_size"]
    model = hf_reference(tiny_model_dir)
    max_tokens = 6
    before = stats(cluster)["migrations"]
    # Long prompts: the kill lands while prefill-0 still works through the ones it took.
    reqs = requests(streams.address, "p", prompts(16, vocab, seed=4, low=600, high=1100),
                    max_tokens)
    streams.submit(reqs)
    old = kill(cluster, "prefill-0")
    streams.wait_finished([r.request_id for r in reqs], timeout_s=90)
    assert_exact(streams, reqs, model, max_tokens)
    after = stats(cluster)
    assert after["migrations"] > before and after["migrations_failed"] == 0, after
    assert max(streams.stalls) < MAX_STALL_S, streams.stalls
    print(f"{after['migrations'] - before} migrations, from {after['migrated_from_phase']}")
    wait_readmitted(cluster, "prefill-0", old=old)
    wait_until(lambda: all_blocks_free(cluster), 10, "blocks free after the migrations")


def test_seeded_stream_continues_as_it_would_have(cluster, streams):
    vocab = cluster.infos["prefill-0"]["vocab_size"]
    batch = prompts(1, vocab, seed=5, low=20, high=21) * 2
    seeded = {"temperature": 1.0, "top_k": 40, "seed": 4242}
    plain, migrated = requests(streams.address, "s", batch, 60, **seeded)
    streams.submit([plain])
    streams.wait_finished([plain.request_id])
    streams.submit([migrated])
    streams.wait(lambda: len(streams.tokens(migrated.request_id)) >= 3, 60, "3 tokens")
    worker = next(c.worker_id for c in reversed(streams.chunks[migrated.request_id])
                  if c.worker_id.startswith("decode"))
    old = kill(cluster, worker)
    streams.wait_finished([migrated.request_id])
    assert streams.final(migrated.request_id).finish_reason == "length"
    assert streams.tokens(migrated.request_id) == streams.tokens(plain.request_id)
    assert any(c.attempt == 1 for c in streams.chunks[migrated.request_id])
    wait_readmitted(cluster, worker, old=old)


def test_a_loss_while_migrating_ends_the_request_clearly(cluster, streams):
    """Both decode workers die at once: the first loss migrates the stream, and its
    continuation finds no decode worker (or loses the second one): one typed error."""
    vocab = cluster.infos["prefill-0"]["vocab_size"]
    (req,) = requests(streams.address, "m", prompts(1, vocab, seed=6, low=20, high=21), 400)
    streams.submit([req])
    streams.wait(lambda: len(streams.tokens(req.request_id)) >= 3, 60, "3 tokens")
    olds = {w: kill(cluster, w) for w in ("decode-0", "decode-1")}
    streams.wait_finished([req.request_id], timeout_s=10)
    final = streams.final(req.request_id)
    assert final.finish_reason == "error" and final.error_type == "WorkerLost", final
    assert "decode-" in final.error
    for worker, old in olds.items():
        wait_readmitted(cluster, worker, old=old)
    wait_until(lambda: all_blocks_free(cluster), 10, "blocks free after the failed migration")


def test_a_continuation_that_never_comes_times_out_and_frees_everything(cluster):
    """A gateway that never answers the Resume (this collector does not): the request fails
    with WorkerLost naming the missing continuation once the router stops waiting, the
    router forgets it, and every block is free."""
    collector = ChunkCollector()
    try:
        vocab = cluster.infos["prefill-0"]["vocab_size"]
        (req,) = requests(collector.address, "lost", prompts(1, vocab, seed=7, low=20, high=21),
                          400)
        rid = req.request_id
        ray.get(cluster.router.submit.remote(req))
        collector.wait_tokens(rid, 3)
        worker = next(c.worker_id for c in reversed(collector.chunks[rid])
                      if c.worker_id.startswith("decode"))
        old = kill(cluster, worker)
        killed = time.monotonic()
        collector.wait_finished([rid], timeout_s=RESUME_TIMEOUT_S + 20)
        waited = time.monotonic() - killed
        final = collector.final(rid)
        assert final.finish_reason == "error" and final.error_type == "WorkerLost", final
        assert "no continuation" in final.error and worker in final.error
        assert [r.attempt for r in collector.resumes] == [1] and waited >= RESUME_TIMEOUT_S
        assert stats(cluster)["in_flight"] == 0
        print(f"failed {waited:.1f} s after the kill")
        wait_readmitted(cluster, worker, old=old)
        wait_until(lambda: all_blocks_free(cluster), 10, "blocks free after the lost resume")
    finally:
        collector.close()


async def sse_streams(url: str, batch, max_tokens: int, watched: int, count: int, kill_now):
    """Streams `batch` concurrently through /v1/completions (token ids back); calls `kill_now`
    (in a thread) once stream `watched` has `count` tokens. Per stream: (token ids, arrival
    times of its token events, finish_reason)."""
    got = [([], [], None) for _ in batch]
    reached = asyncio.Event()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "tiny", "prompt": batch[i], "max_tokens": max_tokens,
                "min_tokens": max_tokens, "temperature": 0, "stream": True,
                "return_token_ids": True}
        ids, times, _ = got[i]
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for event in sse_events(response):
                choice = event["choices"][0]
                if choice.get("token_ids"):
                    ids.extend(choice["token_ids"])
                    times.append(time.monotonic())
                if choice["finish_reason"]:
                    got[i] = (ids, times, choice["finish_reason"])
                if i == watched and len(ids) >= count:
                    reached.set()

    async def killer() -> None:
        await reached.wait()
        await asyncio.to_thread(kill_now)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(one(client, i) for i in range(len(batch))))
        await asyncio.wait_for(kill_task, 60)
    return got


def test_http_streams_continue_token_exact_when_the_decode_worker_is_killed(
    cluster, tiny_model_dir, hf_reference
):
    """16 concurrent greedy SSE streams through the real gateway (uvicorn, HTTP, its ZMQ
    receiver and StreamResume); the busier decode worker killed with -9 once a random
    stream has a random number of tokens: every stream ends with exactly the tokens
    transformers gives, no wait between two of its tokens reaches MAX_STALL_S, and every
    block is free afterwards."""
    wait_all_ready(cluster)
    wait_pairs_ready(cluster)  # else the victim's requests may all still be in transfer
    rng = random.Random(21)
    vocab = cluster.infos["prefill-0"]["vocab_size"]
    max_tokens = 40
    batch = prompts(16, vocab, seed=11, low=16, high=64)
    model = hf_reference(tiny_model_dir)
    before = stats(cluster)
    killed: list[tuple[str, str, dict[str, int]]] = []
    app = build_app(cluster.config, cluster.router, cluster.max_model_len)
    with serve(app) as url:
        got = asyncio.run(sse_streams(url, batch, max_tokens, rng.randrange(len(batch)),
                                      rng.randint(1, 12),
                                      lambda: killed.append(kill_busiest(cluster, "decode"))))
    gaps = []
    for prompt, (ids, times, reason) in zip(batch, got, strict=True):
        assert reason == "length" and ids == hf_greedy(model, prompt, max_tokens)
        gaps.append(max(b - a for a, b in zip(times, times[1:], strict=False)))
    after = stats(cluster)
    assert after["migrations"] > before["migrations"], (
        f"no stream migrated: (worker killed, its incarnation, this router's requests per "
        f"worker) at the kill {killed}; router stats {after}")
    assert after["migrations_failed"] == before["migrations_failed"], after
    assert max(gaps) < MAX_STALL_S, gaps
    print(f"{after['migrations'] - before['migrations']} migrations; longest wait between tokens "
          f"{max(gaps):.2f} s")
    wait_readmitted(cluster, killed[0][0], old=killed[0][1])
    wait_until(lambda: all_blocks_free(cluster), 10, "blocks free after the migrations")
