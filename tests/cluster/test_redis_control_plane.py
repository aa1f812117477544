"""The control plane in a real Redis: the same answers as the in-memory one; two routers
share one truth (a router started later, e.g. restarted, routes a repeated prefix to the
worker holding it without having seen its events, and sees the workers' heartbeats); Redis
killed mid-run: requests keep succeeding, routing falls back to load only and /health says
so; Redis back: healthy again."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis

from cluster.control_plane.redis_keys import RedisKeys
from cluster.control_plane.redis_plane import RedisControlPlane
from cluster.metrics import GatewayMetrics
from router.control_plane import MemoryControlPlane
from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import LocalHandle
from tests.cluster.helpers import ChunkCollector, prompts, request
from tests.cluster.redis_server import RedisServer
from tests.cluster.test_disaggregated_workers import make_spec
from tests.router.test_cache_aware_routing import BLOCK, route_one_by_one
from workers.actors.colocated_worker import ColocatedWorker
from workers.engine.prefix_cache import block_hashes, cache_root
from workers.errors import InvalidParameter

CLUSTER = "kvrelay"
"""ClusterConfig.name's default, which `kvrelay serve` uses."""


@pytest.fixture()
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()


@pytest.fixture()
def workers(tiny_model_dir):
    workers = [ColocatedWorker(make_spec(tiny_model_dir, f"w{i}", "inproc")) for i in range(2)]
    yield workers
    for worker in workers:
        worker.shutdown()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_redis_and_memory_planes_answer_alike(backend, request):
    plane = (MemoryControlPlane() if backend == "memory"
             else RedisControlPlane(request.getfixturevalue("redis_server").url, CLUSTER))
    root = cache_root("tiny", "float32", 4)
    tokens = list(range(4, 24))
    names = block_hashes(root, tokens, 4)
    plane.apply_kv_events("w0", {"root": root.hex(), "reset": False,
                                 "events": [["stored", n] for n in names[:3]]})
    plane.apply_kv_events("w1", {"root": root.hex(), "reset": False,
                                 "events": [["stored", n] for n in names]
                                 + [["removed", names[1]]]})
    assert plane.overlap(tokens, 4, ["w0", "w1", "w2"]) == {"w0": 3, "w1": 1}
    plane.apply_kv_events("w0", {"root": root.hex(), "reset": True,
                                 "events": [["stored", names[0]]]})
    plane.heartbeat("w0", {"role": "colocated", "free_blocks": 7})
    plane.heartbeat("w1", {"role": "colocated", "free_blocks": 9})
    plane.drop_worker("w1")
    assert plane.overlap(tokens, 4, ["w0", "w1"]) == {"w0": 1}
    assert list(plane.workers()) == ["w0"] and str(plane.workers()["w0"]["free_blocks"]) == "7"
    stats = plane.stats()
    assert stats["healthy"] and stats["routing"] == "cache_aware"
    assert stats["kv_events_applied"] == 10 and stats["backend"] == backend


def test_clusters_sharing_one_redis_see_only_their_own_workers_loads_and_blocks(redis_server):
    """Keys are under the cluster's name: two clusters (alpha, beta) on one Redis, with the
    same worker ids, keep apart their heartbeats, shared loads, KV index, drops and Redis
    epoch; a second plane of alpha (another router of it) sees alpha's. A name with glob
    characters scans only its own keys; a name with braces is refused."""
    url = redis_server.url
    alpha, alpha2, beta = (RedisControlPlane(url, name) for name in ("alpha", "alpha", "beta"))
    root = cache_root("tiny", "float32", 4)
    tokens = list(range(4, 24))
    names = block_hashes(root, tokens, 4)
    alpha.heartbeat("w0", {"role": "colocated", "incarnation": "a0"})
    beta.heartbeat("w0", {"role": "decode", "incarnation": "b0"})
    beta.heartbeat("w1", {"role": "decode", "incarnation": "b1"})
    assert {w: f["incarnation"] for w, f in alpha2.workers().items()} == {"w0": "a0"}
    assert {w: f["incarnation"] for w, f in beta.workers().items()} == {"w0": "b0", "w1": "b1"}

    alpha.apply_kv_events("w0", {"root": root.hex(), "reset": False,
                                 "events": [["stored", n] for n in names[:3]]})
    assert beta.overlap(tokens, 4, ["w0"]) == {}  # no root, no blocks of beta's w0
    beta.apply_kv_events("w0", {"root": root.hex(), "reset": False,
                                "events": [["stored", names[0]]]})
    assert alpha2.overlap(tokens, 4, ["w0"]) == {"w0": 3}
    assert beta.overlap(tokens, 4, ["w0"]) == {"w0": 1}

    assert alpha.share_loads({"w0": (100, 1)}) == {}
    assert "'alpha'" in alpha.take_resync()  # alpha's epoch was missing
    assert beta.share_loads({"w0": (7, 1)}) == {}  # alpha's load is not beta's
    assert "'beta'" in beta.take_resync()  # alpha's epoch is not beta's
    assert alpha2.share_loads({"w0": (0, 0)}) == {"w0": (100, 1)}
    assert alpha2.take_resync() is None
    assert beta.share_loads({"w0": (7, 1)}) == {}  # its only entry is its own

    beta.drop_worker("w0")
    assert RedisControlPlane(url, "alpha").overlap(tokens, 4, ["w0"]) == {"w0": 3}
    assert list(alpha2.workers()) == ["w0"] and list(beta.workers()) == ["w1"]
    assert alpha2.share_loads({"w0": (0, 0)}) == {"w0": (100, 1)}
    client = redis.Redis.from_url(url)
    assert {key.split(b"}")[0] for key in client.keys("*")} == {b"kvrelay:{alpha",
                                                                 b"kvrelay:{beta"}

    starred, plain = RedisControlPlane(url, "x*"), RedisControlPlane(url, "xy")
    plain.heartbeat("w2", {"role": "prefill"})
    assert starred.workers() == {} and list(plain.workers()) == ["w2"]
    starred.heartbeat("w3", {"role": "prefill"})
    assert list(starred.workers()) == ["w3"] and list(plain.workers()) == ["w2"]
    with pytest.raises(InvalidParameter, match="without braces"):
        RedisControlPlane(url, "a}:worker:{b")


def make_core(workers, plane, policy: str = "cache_aware") -> RouterCore:
    core = RouterCore(RouterConfig(block_size=BLOCK, poll_interval_s=0.05,
                                   colocated_policy=policy), plane)
    for worker in workers:
        core.add_worker(worker.worker_id, "colocated", LocalHandle(worker))
    return core


def test_a_second_router_sees_the_first_ones_index_and_heartbeats(workers, collector,
                                                                  redis_server):
    vocab = workers[0].ready()["vocab_size"]
    systems = prompts(2, vocab, seed=21, low=40, high=41)
    first = [request(f"a{i}", systems[i] + [300 + i], collector.address, 2) for i in range(2)]
    later = [request(f"b{i}", systems[p] + [400 + i], collector.address, 2)
             for i, p in enumerate([1, 1, 0, 1])]

    async def run() -> tuple[list[str], list[str], dict, list[dict]]:
        core_a = make_core(workers, RedisControlPlane(redis_server.url, CLUSTER))
        await core_a.wait_ready(10)
        core_a.start()
        placed_a = await route_one_by_one(core_a, collector, first)
        await core_a.stop()  # this router is gone; its events are in Redis
        plane_b = RedisControlPlane(redis_server.url, CLUSTER)
        seen = plane_b.workers()
        core_b = make_core(workers, plane_b)
        await core_b.wait_ready(10)
        core_b.start()
        placed_b = await route_one_by_one(core_b, collector, later)
        metrics = core_b.worker_metrics()
        await core_b.stop()
        return placed_a, placed_b, seen, metrics

    placed_a, placed_b, seen, metrics = asyncio.run(run())
    assert placed_a[0] != placed_a[1]
    assert placed_b == [placed_a[p] for p in [1, 1, 0, 1]]
    assert set(seen) == {"w0", "w1"} and seen["w0"]["role"] == "colocated"
    # Prometheus: per worker its prefix cache and the KV events the router applied from it;
    # the router's control plane (health, Redis round trips).
    text = GatewayMetrics().render(metrics).decode()
    for name in ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_rate",
                 "kv_events_applied"):
        assert f'kvrelay_worker_{name}{{worker="w0"}}' in text
    assert "kvrelay_router_control_plane_healthy 1.0" in text
    assert "kvrelay_router_redis_round_trip_mean_s" in text
    assert "kvrelay_router_kv_events_applied" in text


def held_in_redis(server: RedisServer, worker_ids) -> dict[str, int]:
    client = redis.Redis.from_url(server.url)
    keys = RedisKeys(CLUSTER)
    return {wid: client.scard(keys.worker_key("held", wid)) for wid in worker_ids}


def test_redis_killed_mid_run_requests_succeed_then_restarted_empty_the_index_is_rebuilt(
        workers, collector, redis_server, caplog):
    """Redis gone: requests succeed, /health says load only. Redis back on the same port
    with nothing in it: the workers re-publish their cached blocks (the logs say so), /health
    says cache-aware again, and repeated prefixes cached before the outage go to their
    holders (the index knows them although every event of theirs was lost)."""
    vocab = workers[0].ready()["vocab_size"]
    systems = prompts(2, vocab, seed=31, low=40, high=41)
    first = [request(f"k{i}", systems[i] + [300 + i], collector.address, 3) for i in range(2)]
    during = [request(f"d{i}", p, collector.address, 3)
              for i, p in enumerate(prompts(2, vocab, seed=32, low=9, high=20))]
    pattern = [1, 0, 1]
    after = [request(f"a{i}", systems[p] + [400 + i], collector.address, 3)
             for i, p in enumerate(pattern)]
    ids = ["w0", "w1"]

    async def wait_rebuilt(core: RouterCore) -> dict:
        deadline = time.monotonic() + 30
        while True:
            plane, held = core.health()["control_plane"], held_in_redis(redis_server, ids)
            if plane["routing"] == "cache_aware" and all(held.values()):
                return plane
            assert time.monotonic() < deadline, f"index not rebuilt: {plane} {held}"
            await asyncio.sleep(0.1)

    async def run() -> tuple[list[str], dict, dict, dict, list[str]]:
        core = make_core(workers, RedisControlPlane(redis_server.url, CLUSTER, retry_s=0.2))
        await core.wait_ready(10)
        core.start()
        placed_first = await route_one_by_one(core, collector, first)
        before = core.health()["control_plane"]
        redis_server.stop()
        await route_one_by_one(core, collector, during)
        down = core.health()["control_plane"]
        redis_server.start()
        rebuilt = await wait_rebuilt(core)
        placed_after = await route_one_by_one(core, collector, after)
        await core.stop()
        return placed_first, before, down, rebuilt, placed_after

    with caplog.at_level(logging.WARNING):
        placed_first, before, down, rebuilt, placed_after = asyncio.run(run())
    for req in first + during + after:
        final = collector.final(req.request_id)
        assert final.finish_reason == "length" and final.num_output_tokens == 3
    assert placed_first[0] != placed_first[1]
    assert placed_after == [placed_first[p] for p in pattern]
    assert before["healthy"] and before["routing"] == "cache_aware"
    assert before["workers_heard"] == ["w0", "w1"] and down["workers_heard"] == []
    assert not down["healthy"] and down["routing"] == "load_only"
    assert "unreachable" in down["error"]
    assert rebuilt["healthy"] and rebuilt["redis_round_trips"] > before["redis_round_trips"]
    assert rebuilt["resyncs"] > before["resyncs"] and rebuilt["workers_heard"] == ["w0", "w1"]
    text = caplog.text
    assert "falls back to load only" in text and "answers again" in text
    assert "asking 2 workers to re-publish their cached KV blocks" in text


def test_each_router_counts_the_requests_other_routers_put_on_a_worker(
        workers, collector, redis_server):
    """Least-tokens placement in router B sees router A's long request on worker X (shared
    loads in Redis) and sends B's short requests to the other worker; once A stops
    publishing, its entry goes stale and B no longer counts it."""
    vocab = workers[0].ready()["vocab_size"]
    long_one = request("long", prompts(1, vocab, seed=41, low=20, high=21)[0],
                       collector.address, 400)
    short = [request(f"s{i}", p, collector.address, 2)
             for i, p in enumerate(prompts(4, vocab, seed=42, low=6, high=10))]

    async def wait_for(predicate, what: str) -> None:
        deadline = time.monotonic() + 20
        while not predicate():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.02)

    async def run() -> tuple[str, int, int]:
        core_a, core_b = (make_core(workers, RedisControlPlane(redis_server.url, CLUSTER,
                                                               load_ttl_s=1.0),
                                    "least_tokens") for _ in range(2))
        for core in (core_a, core_b):
            await core.wait_ready(10)
            core.start()
        await core_a.submit(long_one)
        (worker_x,) = core_a.requests[long_one.request_id].life.holders
        seen = long_one.sampling.max_tokens + len(long_one.prompt_token_ids)
        await wait_for(lambda: core_b.placement.load(worker_x).outstanding_tokens == seen,
                       "router B never saw router A's load")
        for req in short:
            await core_b.submit(req)
        counted = core_b.placement.load(worker_x).outstanding_tokens
        await core_a.stop()  # its last published load goes stale within load_ttl_s
        await wait_for(lambda: core_b.placement.load(worker_x).outstanding_tokens == 0,
                       "router A's stale load still counted")
        await asyncio.to_thread(collector.wait_finished, [r.request_id for r in short], 60)
        await core_b.stop()
        return worker_x, counted, seen

    worker_x, counted, seen = asyncio.run(run())
    placed = [collector.final(r.request_id).worker_id for r in short]
    assert all(p != worker_x for p in placed), (worker_x, placed)
    assert counted == seen
    for worker in workers:
        worker.abort(long_one.attempt_id)


def test_a_worker_restarted_while_no_router_watched_loses_its_index(
        workers, collector, redis_server, tiny_model_dir):
    """A router starts from the incarnation Redis last heard of each worker: one that is a
    new incarnation (restarted meanwhile, its cache empty) has its stale index dropped."""
    vocab = workers[0].ready()["vocab_size"]
    system = prompts(1, vocab, seed=51, low=40, high=41)[0]

    async def first() -> str:
        core = make_core(workers, RedisControlPlane(redis_server.url, CLUSTER))
        await core.wait_ready(10)
        core.start()
        (placed,) = await route_one_by_one(core, collector, [request(
            "old", system + [5], collector.address, 2)])
        await core.stop()
        return placed

    placed = asyncio.run(first())
    assert held_in_redis(redis_server, [placed])[placed] > 0
    index = [w.worker_id for w in workers].index(placed)
    workers[index].shutdown()
    workers[index] = ColocatedWorker(make_spec(tiny_model_dir, placed, "inproc"))

    async def second() -> dict[str, int]:
        core = make_core(workers, RedisControlPlane(redis_server.url, CLUSTER))
        await core.wait_ready(10)
        overlap = core.control_plane.overlap(system, BLOCK, [placed])
        await core.stop()
        return overlap

    assert asyncio.run(second()).get(placed, 0) == 0
