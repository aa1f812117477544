"""Two real gateways on one Ray cluster sharing a real Redis, over HTTP: `kvrelay serve` (A:
two colocated workers, cache-aware routing, `--redis-url`) and `kvrelay serve --join` (B: its
own Router over A's workers). One cluster serves every test below, in order:
- both serve concurrently (greedy text equal to transformers), B's cache-aware routing
  sends a prefix that A's requests cached to the worker holding it (one KV index), and B
  counts A's request in flight on its worker (shared loads);
- A's Router actor killed mid-stream: the stream finishes (the same text as the request run
  with no router dying), Ray restarts the Router, it rebuilds from Redis, requests succeed
  again and still hit the worker holding their prefix;
- redis-server killed: requests through both keep succeeding, /health says load only;
  restarted empty on the same port: the workers re-publish their cached blocks (the logs
  say so), /health says cache-aware again and prefixes cached before the outage hit;
- B stopped: A and its workers go on.
Plus the CLI's refusals: --join without --redis-url, and with no cluster to join."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
import redis

from cluster.config import ClusterConfig
from cluster.control_plane.redis_keys import RedisKeys
from cluster.join import NoClusterToJoin, join
from cluster.launcher import control_plane_factory
from cluster.serve import build_config, describe, parse_args
from cluster.serve import main as serve_main
from router.router_state import RouterConfig
from tests.cluster.helpers import hf_greedy, kill_and_wait_restarted, prompts
from tests.cluster.redis_server import RedisServer
from tests.e2e.served_process import ServeProcess
from workers.config import EngineConfig
from workers.errors import InvalidParameter
from workers.text.tokenizer import Tokenizer

BLOCK = 8
PREFIX = 40  # five full blocks
WORKERS = ["colocated-0", "colocated-1"]


@contextlib.contextmanager
def joined_gateways(args: list[str], logs: Path) -> Iterator[tuple[ServeProcess, ServeProcess,
                                                                   RedisServer, list[str]]]:
    """(A, B, redis server, A's flags): `kvrelay serve ARGS` with `--redis-url` to a real
    redis-server on a local Ray, and B, the same with `--join`; all stopped after."""
    ray.init(num_cpus=2, include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    server = RedisServer().start()
    args = [*args, "--redis-url", server.url,
            "--ray-address", ray.get_runtime_context().gcs_address]
    gateways: list[ServeProcess] = []
    try:
        gateways.append(ServeProcess(args, logs / "a.log", ready_timeout_s=240))
        gateways.append(ServeProcess([*args, "--join"], logs / "b.log", ready_timeout_s=240))
        yield gateways[0], gateways[1], server, args
    finally:
        for gateway in gateways:
            gateway.close()
        server.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """(A, B, redis server): two gateways on one Ray, B joined to A's workers."""
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--colocated", "2",
            "--colocated-policy", "cache_aware", "--block-size", str(BLOCK), "--num-blocks",
            "256", "--served-model-name", "tiny"]
    with joined_gateways(args, tmp_path_factory.mktemp("gateways")) as (a, b, server, _):
        yield a, b, server


@pytest.fixture(scope="module")
def systems(tiny_model_dir) -> list[list[int]]:
    """Three prompt prefixes of five full blocks each."""
    return prompts(3, 500, seed=71, low=PREFIX, high=PREFIX + 1)


def complete(url: str, prompt: list[int], max_tokens: int = 2) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def cached(url: str, prompt: list[int]) -> int:
    return complete(url, prompt)["usage"]["prompt_tokens_details"]["cached_tokens"]


def control_plane(url: str, want: str, timeout_s: float = 30.0) -> dict:
    """/health's control_plane once its routing is `want` (the gateway caches /health ~1 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{url}/health", timeout=30).json()
        if state.get("control_plane", {}).get("routing") == want:
            return state
        assert time.monotonic() < deadline, f"{url}: routing not {want}: {state}"
        time.sleep(0.3)


def wait_log(gateway: ServeProcess, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in gateway.log():
        assert time.monotonic() < deadline, f"{text!r} not in {gateway.log_path}"
        time.sleep(0.3)


def test_join_flags_reach_the_config(tiny_model_dir):
    config = build_config(parse_args([
        "--model", str(tiny_model_dir), "--join", "--redis-url", "redis://127.0.0.1:1/0",
        "--colocated-policy", "cache_aware"]))
    assert config.join and config.redis_url == "redis://127.0.0.1:1/0"
    assert config.router.colocated_policy == "cache_aware"
    assert "joined cluster 'kvrelay'" in describe(config)
    # Another router's shared load stays fresh for ten of its polls (at least 2 s).
    slow = dataclasses.replace(config, router=dataclasses.replace(config.router,
                                                                  poll_interval_s=0.5))
    assert control_plane_factory(slow)().load_ttl_s == 5.0
    assert control_plane_factory(config)().load_ttl_s == 2.0


def test_cluster_name_flag_names_the_redis_keys_and_a_brace_is_refused_before_ray(
        tiny_model_dir, capsys):
    args = ["--model", str(tiny_model_dir), "--redis-url", "redis://127.0.0.1:1/0"]
    assert build_config(parse_args(args)).name == "kvrelay"
    config = build_config(parse_args([*args, "--cluster-name", "blue", "--join"]))
    assert config.name == "blue" and "joined cluster 'blue'" in describe(config)
    assert control_plane_factory(config)().keys.prefix == "kvrelay:{blue}"
    assert serve_main([*args, "--cluster-name", "a{b}"]) == 2  # before Ray starts
    assert "cluster name 'a{b}'" in capsys.readouterr().err


def test_rescan_interval_flag_reaches_the_router_config_and_must_be_positive(tiny_model_dir,
                                                                             capsys):
    args = ["--model", str(tiny_model_dir), "--redis-url", "redis://127.0.0.1:1/0"]
    assert build_config(parse_args(args)).router.rescan_interval_s == 2.0
    config = build_config(parse_args([*args, "--rescan-interval", "0.5"]))
    assert config.router.rescan_interval_s == 0.5
    for bad in (0.0, -1.0):
        with pytest.raises(InvalidParameter, match="rescan_interval_s.*must be > 0"):
            RouterConfig(rescan_interval_s=bad)
    assert serve_main([*args, "--rescan-interval", "0"]) == 2  # before Ray starts
    assert "--rescan-interval) must be > 0 s" in capsys.readouterr().err


def test_join_without_redis_url_or_without_a_cluster_is_refused(cluster, tiny_model_dir,
                                                                capsys):
    assert serve_main(["--model", str(tiny_model_dir), "--join"]) == 2
    assert "--join needs --redis-url" in capsys.readouterr().err
    # Workers of cluster 'kvrelay' are heard of in this Redis, none of 'nobody-here'.
    config = ClusterConfig(engine=EngineConfig(model=str(tiny_model_dir)), join=True,
                           model_name="tiny", name="nobody-here", redis_url=cluster[2].url,
                           ray_address=ray.get_runtime_context().gcs_address)
    with pytest.raises(NoClusterToJoin, match="no kvrelay cluster 'nobody-here' to join"):
        join(config)


def test_two_gateways_serve_at_once_and_share_one_kv_index(cluster, systems, tiny_model_dir,
                                                           hf_reference):
    a, b, _ = cluster
    for i, system in enumerate(systems):  # cached on the workers through A
        assert cached(a.url, [*system, 300 + i]) == 0
    time.sleep(1.0)  # a poll or two: their KV events are in Redis
    for i, system in enumerate(systems):  # B routes each to its holder
        assert cached(b.url, [*system, 400 + i]) == PREFIX, f"prefix {i} missed"
    tokenizer, model = Tokenizer(tiny_model_dir), hf_reference(tiny_model_dir)
    batch = prompts(8, 500, seed=72, low=3, high=30)

    async def both() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int, prompt: list[int]) -> dict:
                url = (a if i % 2 else b).url
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                        "ignore_eos": True}
                response = await client.post(f"{url}/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))

    for prompt, answer in zip(batch, asyncio.run(both()), strict=True):
        assert answer["choices"][0]["text"] == tokenizer.decode(hf_greedy(model, prompt, 6))
    # One truth on loads: a long request through A counts in B's view of its worker.
    long_prompt = prompts(1, 500, seed=74, low=10, high=11)[0]
    want = len(long_prompt) + 1500
    body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{a.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        deadline = time.monotonic() + 30
        while not any(w.get("outstanding_tokens") == want for w in
                      httpx.get(f"{b.url}/v1/metrics", timeout=30).json()["workers"]):
            assert time.monotonic() < deadline, "B never counted A's request"
            time.sleep(0.1)
    # Leaving the stream: the client is gone, A aborts the request.
    state = control_plane(b.url, "cache_aware")
    assert state["workers"]["colocated"] == {"ready": 2, "known": 2}
    assert state["control_plane"]["backend"] == "redis"
    assert state["control_plane"]["workers_heard"] == WORKERS


def stream_in_background(url: str, prompt: list[int], max_tokens: int,
                         first_token: threading.Event) -> tuple[threading.Thread, dict]:
    """A streamed completion in a thread: sets `first_token`, fills the dict when done."""
    result: dict = {}

    def run() -> None:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        text, reason = "", None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                result.setdefault("errors", []).extend([event["error"]] if "error" in event
                                                       else [])
                for choice in event.get("choices", []):
                    text += choice["text"]
                    reason = choice["finish_reason"] or reason
                    first_token.set()
                result["usage"] = event.get("usage") or result.get("usage")
        result.update(text=text, finish_reason=reason)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_a_killed_router_rebuilds_from_redis_and_routing_still_hits(cluster, systems):
    a, b, _ = cluster
    # Mid-run: a stream through A is under way when its Router dies; it finishes on its
    # worker (whose own final chunk ends it) while Ray restarts the Router.
    running = prompts(1, 500, seed=75, low=12, high=13)[0]
    first_token = threading.Event()
    thread, streamed = stream_in_background(a.url, running, 200, first_token)
    assert first_token.wait(60), "the stream never started"
    kill_and_wait_restarted(ray.get_actor("kvrelay-router", namespace="kvrelay"), 120)
    deadline = time.monotonic() + 120
    while True:  # calls may fail (503) until the gateway reaches the restarted Router
        body = {"model": "tiny", "prompt": [*systems[0], 450], "max_tokens": 2,
                "temperature": 0}
        response = httpx.post(f"{a.url}/v1/completions", json=body, timeout=120)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, "the router did not come back"
        time.sleep(0.5)
    # The restarted router never saw these prefixes stored: its index is Redis's.
    assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == PREFIX
    for i, system in enumerate(systems[1:]):
        assert cached(a.url, [*system, 460 + i]) == PREFIX
    # B's view of the stream's worker: the killed router's last published load counts until
    # it is stale (2 s), and outweighs the cached prefix meanwhile.
    deadline = time.monotonic() + 30
    while any(w.get("outstanding_tokens") for w in
              httpx.get(f"{b.url}/v1/metrics", timeout=30).json()["workers"]):
        assert time.monotonic() < deadline, "the killed router's loads never went stale"
        time.sleep(0.2)
    assert cached(b.url, [*systems[0], 470]) == PREFIX  # B served on meanwhile
    assert control_plane(a.url, "cache_aware")["workers"]["colocated"]["ready"] == 2
    thread.join(120)
    assert not streamed.get("errors") and streamed["finish_reason"] == "length"
    assert streamed["usage"]["completion_tokens"] == 200
    # The same greedy text as the request run whole with no router dying under it.
    assert streamed["text"] == complete(b.url, running, 200)["choices"][0]["text"]


def test_redis_outage_serving_goes_on_and_the_index_is_rebuilt(cluster, systems):
    a, b, server = cluster
    server.stop()
    fresh = prompts(4, 500, seed=73, low=5, high=20)
    for i, prompt in enumerate(fresh):
        complete((a if i % 2 else b).url, prompt)
    for gateway in (a, b):
        state = control_plane(gateway.url, "load_only")
        assert not state["control_plane"]["healthy"]
    server.start()  # same port, nothing in it
    for gateway in (a, b):
        control_plane(gateway.url, "cache_aware")
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 30
    keys = RedisKeys(ClusterConfig.name)  # `kvrelay serve`'s cluster name
    while not all(client.scard(keys.worker_key("held", wid)) for wid in WORKERS):
        assert time.monotonic() < deadline, "the workers' blocks never reached the new Redis"
        time.sleep(0.2)
    # Prefixes cached before the outage (whose events Redis never kept) hit their holders.
    for i, system in enumerate(systems):
        assert cached(b.url, [*system, 480 + i]) == PREFIX, f"prefix {i} missed"
    for gateway in (a, b):
        wait_log(gateway, "asking 2 workers to re-publish their cached KV blocks")
        wait_log(gateway, "falls back to load only")


def test_stopping_the_joined_gateway_leaves_the_workers_serving(cluster, systems):
    a, b, _ = cluster
    b.send(signal.SIGTERM, group=False)
    b.wait_exit(60)
    assert b.process.returncode == 0, b.log()[-2000:]
    for wid in WORKERS:
        ray.get_actor(f"kvrelay-{wid}", namespace="kvrelay")  # still there
    assert cached(a.url, [*systems[1], 490]) == PREFIX
    assert control_plane(a.url, "cache_aware")["workers"]["colocated"]["ready"] == 2
