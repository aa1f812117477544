"""`kvrelay serve --join` on a disaggregated cluster, two real gateway processes over HTTP: A
(`kvrelay serve`, 1 prefill + 1 decode worker over gloo, `--redis-url` to a real
redis-server) and B (`--join`: its own Router over A's workers). In order:
- requests through B (and A, at once) give transformers' greedy text;
- a decode worker started after B joined (a pool scaled up) is admitted by B's Router with no
  restart of B; once the first decode worker is killed for good, B forgets it and serves
  every request through the new one (its KV pair with the prefill worker set up at
  admission), token-exact; B's /metrics has the new worker's per-rank KV gauges and none of
  the gone one;
- a decode worker restarted under a new actor of the old name: B admits it, and serves
  through it alone when the other decode worker is gone too.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families

from cluster.launcher import worker_options, worker_spec
from cluster.serve import build_config, parse_args
from tests.cluster.helpers import hf_greedy, prompts
from tests.cluster.test_redis_gateways import joined_gateways
from tests.e2e.served_process import tiny_serve_args
from workers.actors.worker_actor import WorkerActor
from workers.text.tokenizer import Tokenizer

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """(A, B, A's flags): B joined to A's 1P+1D cluster."""
    with joined_gateways(tiny_serve_args(tiny_model_dir),
                         tmp_path_factory.mktemp("joined")) as (a, b, _, args):
        yield a, b, args


@pytest.fixture(scope="module")
def cases(tiny_model_dir, hf_reference) -> list[tuple[list[int], str]]:
    """(prompt, transformers' greedy text) of prompts whose greedy continuation never picks
    EOS: hf_greedy bans it (min_new_tokens), ignore_eos serving does not."""
    tokenizer, model = Tokenizer(tiny_model_dir), hf_reference(tiny_model_dir)
    kept = []
    for prompt in prompts(12, 500, seed=81, low=3, high=30):
        tokens = hf_greedy(model, prompt, MAX_TOKENS)
        if _argmax_path(model, prompt, tokens) == tokens:
            kept.append((prompt, tokenizer.decode(tokens)))
    assert len(kept) >= 6
    return kept[:6]


@torch.no_grad()
def _argmax_path(model, prompt: list[int], tokens: list[int]) -> list[int]:
    """Each continuation token's unconstrained argmax given the ones before (EOS allowed)."""
    logits = model(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1:-1].argmax(-1).tolist()


def complete_all(urls: list[str], cases: list[tuple[list[int], str]]) -> list[str]:
    """Each case's text, sent at once, case i through urls[i % len(urls)]."""
    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int, prompt: list[int]) -> str:
                body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                        "temperature": 0, "ignore_eos": True}
                response = await client.post(f"{urls[i % len(urls)]}/v1/completions",
                                             json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(i, p) for i, (p, _) in enumerate(cases)))

    return asyncio.run(run())


def workers_seen(url: str) -> dict[str, dict]:
    """worker_id -> its /v1/metrics entry at this gateway (its Router's view)."""
    workers = httpx.get(f"{url}/v1/metrics", timeout=30).json()["workers"]
    return {w["worker_id"]: w for w in workers if w.get("role") != "router"}


def wait_seen(url: str, want: dict[str, bool], what: str, timeout_s: float = 120) -> dict:
    """Until the gateway's Router knows exactly `want` (worker_id -> ready)."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = workers_seen(url)
        if {wid: w["ready"] for wid, w in seen.items()} == want:
            return seen
        assert time.monotonic() < deadline, f"{url}: {what}: {seen}"
        time.sleep(0.3)


_STARTED: list = []
"""Handles of the workers started here: Ray ends an actor once its owner drops them all."""


def start_decode_worker(args: list[str], worker_id: str, timeout_s: float = 120) -> None:
    """A decode worker of the cluster started from here, as a scaler would: a named actor
    of A's configuration (retried while the name of a just-killed actor is still taken)."""
    config = build_config(parse_args(args))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            actor = ray.remote(WorkerActor).options(
                **worker_options(config, f"{config.name}-{worker_id}")).remote(
                "decode", worker_spec(config, worker_id, "decode"))
            break
        except ValueError:  # the name is still held by the killed actor
            assert time.monotonic() < deadline, f"the name of {worker_id} stays taken"
            time.sleep(0.2)
    _STARTED.append(actor)
    ray.get(actor.execute.remote("ready"), timeout=timeout_s)


def kill_for_good(worker_id: str) -> None:
    ray.kill(ray.get_actor(f"kvrelay-{worker_id}", namespace="kvrelay"), no_restart=True)


def test_joined_gateway_serves_the_disaggregated_cluster_token_exact(cluster, cases):
    a, b, _ = cluster
    assert wait_seen(b.url, {"prefill-0": True, "decode-0": True}, "B's workers")
    state = httpx.get(f"{b.url}/health", timeout=30).json()
    assert state["control_plane"]["backend"] == "redis"
    assert complete_all([b.url], cases) == [text for _, text in cases]
    assert complete_all([a.url, b.url], cases) == [text for _, text in cases]


def rank_kv_workers(url: str, timeout_s: float = 30) -> set[str]:
    """The workers with a per-rank KV capacity gauge in the gateway's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=timeout_s).text
    return {sample.labels["worker"] for family in text_string_to_metric_families(text)
            if family.name == "kvrelay_rank_kv_capacity_bytes" for sample in family.samples}


def test_a_worker_started_after_the_join_is_used_by_the_joined_gateway(cluster, cases):
    a, b, args = cluster
    old = workers_seen(b.url)["decode-0"]["incarnation"]
    start_decode_worker(args, "decode-1")
    wait_seen(b.url, {"prefill-0": True, "decode-0": True, "decode-1": True},
              "decode-1 admitted by B")
    assert rank_kv_workers(b.url) == {"prefill-0", "decode-0", "decode-1"}
    kill_for_good("decode-0")
    wait_seen(b.url, {"prefill-0": True, "decode-1": True}, "decode-0 gone from B")
    assert rank_kv_workers(b.url) == {"prefill-0", "decode-1"}
    assert complete_all([b.url], cases) == [text for _, text in cases]
    # Restarted under a new actor of its old name: admitted again, as a new incarnation.
    start_decode_worker(args, "decode-0")
    seen = wait_seen(b.url, {"prefill-0": True, "decode-0": True, "decode-1": True},
                     "decode-0's new actor admitted by B")
    assert seen["decode-0"]["incarnation"] != old
    kill_for_good("decode-1")
    wait_seen(b.url, {"prefill-0": True, "decode-0": True}, "decode-1 gone from B")
    assert complete_all([b.url], cases) == [text for _, text in cases]
    # A's Router rescans too: it serves through the same new worker.
    wait_seen(a.url, {"prefill-0": True, "decode-0": True}, "A's view")
    assert complete_all([a.url], cases[:2]) == [text for _, text in cases[:2]]
