"""Prefix caching and the Redis control plane on a real Ray cluster over HTTP (1 prefill + 1
decode worker, gloo KV, cache-aware decode routing, `--redis-url` to a real redis-server):
greedy text equals transformers' the first time and again when every prompt is cached, a
repeated prompt reports its cached tokens, /health names the Redis control plane; Redis
killed mid-run: requests keep succeeding and /health says routing is load only."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from cluster.config import ClusterConfig
from router.router_state import RouterConfig
from tests.cluster.redis_server import RedisServer
from tests.e2e.served_cluster import run_workload, served, wait_blocks_free
from workers.config import CacheConfig, EngineConfig

BLOCK = 8


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    yield
    ray.shutdown()


def control_plane(url: str) -> dict:
    """/health's control_plane, once the gateway's cached answer is fresh (<= 1 s old)."""
    time.sleep(1.2)
    httpx.get(f"{url}/health", timeout=30)
    time.sleep(0.2)
    return httpx.get(f"{url}/health", timeout=30).json()["control_plane"]


def test_cached_serving_over_redis_survives_redis_going_away(tiny_model_dir, workload):
    redis_server = RedisServer().start()
    engine = EngineConfig(model=str(tiny_model_dir),
                          cache=CacheConfig(block_size=BLOCK, num_blocks=128))
    config = ClusterConfig(engine=engine, model_name="tiny", name="prefix-redis",
                           num_prefill=1, num_decode=1, kv_transport="gloo",
                           redis_url=redis_server.url,
                           router=RouterConfig(block_size=BLOCK, poll_interval_s=0.1,
                                               decode_policy="cache_aware"))
    try:
        with served(config) as (url, cluster):
            run_workload(url, workload)
            run_workload(url, workload)  # every prompt's full blocks are cached now
            prompt, _, _, _ = max(workload, key=lambda case: len(case[0]))
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
            usage = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == \
                (len(prompt) - 1) // BLOCK * BLOCK
            plane = control_plane(url)
            assert plane["backend"] == "redis" and plane["healthy"]
            assert plane["kv_events_applied"] > 0
            redis_server.stop()
            run_workload(url, workload)
            plane = control_plane(url)
            assert not plane["healthy"] and plane["routing"] == "load_only"
            wait_blocks_free(cluster)
    finally:
        redis_server.stop()
