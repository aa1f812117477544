"""Speculative decoding on the decode worker of a 1P+1D pair (real workers, ZMQ KV transfer,
the router core in this process): greedy output equals transformers, the decode worker
speculates from its first step, the final chunk carries the spec_decode counters and they
equal a colocated engine's on the same prompts; aborts mid-stream leave every block free."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import LocalHandle
from tests.cluster.helpers import ChunkCollector, hf_greedy, request
from tests.cluster.test_disaggregated_workers import make_spec, run_requests, wait_all_free
from workers.actors.decode_worker import DecodeWorker
from workers.actors.prefill_worker import PrefillWorker
from workers.config import SpeculativeConfig
from workers.engine.engine import LLMEngine


def spec_spec(model_dir, worker_id: str, speculative: SpeculativeConfig):
    spec = make_spec(model_dir, worker_id, "zmq")
    return dataclasses.replace(
        spec, engine=dataclasses.replace(spec.engine, speculative=speculative))


def repeating(n: int) -> list[list[int]]:
    return [([7 + i, 40 + i, 90 + 3 * i] * 5)[: 8 + i] for i in range(n)]


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_pd_speculation_matches_transformers_and_colocated_acceptance(
    method, tiny_model_dir, hf_reference, collector
):
    speculative = SpeculativeConfig(method, 4, str(tiny_model_dir) if method == "draft" else None)
    prefill = PrefillWorker(spec_spec(tiny_model_dir, "prefill-0", speculative))
    decode = DecodeWorker(spec_spec(tiny_model_dir, "decode-0", speculative))
    try:
        batch = repeating(4)
        reqs = [request(f"{method}-{i}", p, collector.address, 10) for i, p in enumerate(batch)]
        asyncio.run(run_requests(prefill, decode, collector, reqs))
        colocated = LLMEngine(dataclasses.replace(decode.spec.engine, role="colocated"))
        params = dataclasses.replace(reqs[0].sampling, max_tokens=10)
        expected = colocated.generate(batch, params)
        model = hf_reference(tiny_model_dir)
        drafts = 0
        for req, prompt, out in zip(reqs, batch, expected, strict=True):
            assert collector.tokens(req.request_id) == hf_greedy(model, prompt, 10)
            timings = collector.final(req.request_id).timings
            spec = {k: v for k, v in timings.items() if k.startswith("spec_")}
            assert spec == out.metrics.spec
            drafts += spec.get("spec_decode_num_drafts", 0)
            if method == "draft":  # the draft proposes from the first decode step on
                assert spec["spec_decode_num_drafts"] == 2  # all accepted: k = 4, then 3
        assert drafts > 0
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_aborts_while_the_decode_worker_speculates_free_every_block(tiny_model_dir, collector):
    speculative = SpeculativeConfig("draft", 5, str(tiny_model_dir))
    prefill = PrefillWorker(spec_spec(tiny_model_dir, "prefill-0", speculative))
    decode = DecodeWorker(spec_spec(tiny_model_dir, "decode-0", speculative))

    async def scenario() -> None:
        core = RouterCore(RouterConfig(block_size=8, poll_interval_s=0.05))
        core.add_worker("prefill-0", "prefill", LocalHandle(prefill))
        core.add_worker("decode-0", "decode", LocalHandle(decode))
        await core.wait_ready(10)
        core.start()
        reqs = [request(f"abort-{i}", p, collector.address, 200)
                for i, p in enumerate(repeating(6))]
        await asyncio.gather(*(core.submit(r) for r in reqs))
        for req in reqs:  # each once it streams from the decode worker
            await asyncio.to_thread(collector.wait_tokens, req.request_id, 3, 60)
            await core.abort(req.request_id)
        deadline = time.monotonic() + 10
        while core.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await core.stop()

    try:
        asyncio.run(scenario())
        wait_all_free(prefill, decode, timeout_s=10)
    finally:
        prefill.shutdown()
        decode.shutdown()
