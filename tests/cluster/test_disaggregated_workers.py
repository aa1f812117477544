"""PrefillWorker + DecodeWorker in-process (no Ray) under a RouterCore: greedy output equals
transformers' over the gloo and ZMQ KV paths, blocks return on both workers, and a pair whose
block sizes differ is refused at the handshake with an error naming the field."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import LocalHandle
from tests.cluster.helpers import ChunkCollector, hf_greedy, prompts, request
from workers.actors.decode_worker import DecodeWorker
from workers.actors.prefill_worker import PrefillWorker
from workers.actors.worker_base import WorkerSpec
from workers.config import CacheConfig, EngineConfig, SchedulerConfig


def make_spec(model_dir, worker_id: str, transport: str, block_size: int = 8,
              chunk: int = 0) -> WorkerSpec:
    """`chunk` > 0: chunked prefill of at most that many prompt tokens per step."""
    engine = EngineConfig(model=str(model_dir), cache=CacheConfig(block_size=block_size,
                                                                  num_blocks=64),
                          scheduler=SchedulerConfig(long_prefill_token_threshold=chunk))
    return WorkerSpec(worker_id, engine, kv_transport=transport)



async def run_requests(prefill, decode, collector, reqs, block_size=8,
                       local_prefill_max_tokens=0) -> RouterCore:
    core = RouterCore(RouterConfig(block_size=block_size, poll_interval_s=0.05,
                                   local_prefill_max_tokens=local_prefill_max_tokens))
    core.add_worker("prefill-0", "prefill", LocalHandle(prefill))
    core.add_worker("decode-0", "decode", LocalHandle(decode))
    await core.wait_ready(10)
    core.start()
    await asyncio.gather(*(core.submit(r) for r in reqs))
    ids = [r.request_id for r in reqs]
    await asyncio.to_thread(collector.wait_finished, ids, 120)
    deadline = time.monotonic() + 5
    while core.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await core.stop()
    return core


def wait_all_free(*workers, timeout_s: float = 5.0) -> None:
    """Every block of every worker is free within `timeout_s` (a block is freed once no
    posted send or receive touches it, a moment after its transfer ended)."""
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        while worker.free_blocks() != worker.ready()["total_blocks"]:
            assert time.monotonic() < deadline, f"{worker.worker_id}: blocks not freed"
            time.sleep(0.02)


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()


@pytest.mark.parametrize(("transport", "chunk"), [("gloo", 0), ("gloo", 5), ("zmq", 0)],
                         ids=["gloo-layerwise", "gloo-layerwise-chunked-prefill", "zmq"])
def test_disaggregated_greedy_matches_transformers(transport, chunk, tiny_model_dir,
                                                   hf_reference, collector):
    """gloo streams each layer's blocks during prefill (with chunked prefill: each chunk's,
    partial blocks sent again by the next chunk); zmq moves the prefilled request whole."""
    prefill = PrefillWorker(make_spec(tiny_model_dir, "prefill-0", transport, chunk=chunk))
    decode = DecodeWorker(make_spec(tiny_model_dir, "decode-0", transport))
    try:
        vocab = prefill.ready()["vocab_size"]
        batch = prompts(5, vocab, seed=2)
        lengths = [1, 2, 5, 7, 9]  # max_tokens 1: the request ends on the prefill worker
        reqs = [request(f"{transport}-{chunk}-{i}", p, collector.address, n)
                for i, (p, n) in enumerate(zip(batch, lengths, strict=True))]
        core = asyncio.run(run_requests(prefill, decode, collector, reqs))
        model = hf_reference(tiny_model_dir)
        for req, prompt, n in zip(reqs, batch, lengths, strict=True):
            assert collector.tokens(req.request_id) == hf_greedy(model, prompt, n)
            final = collector.final(req.request_id)
            assert final.finish_reason == "length" and final.num_output_tokens == n
        timed = collector.final(reqs[-1].request_id).timings
        assert timed["transfer_bytes"] > 0 and timed["kv_ready_delay"] >= 0
        assert not core.requests
        wait_all_free(prefill, decode)
        path = next(iter(prefill.transfer_paths().values()))
        assert path["path"] == transport and path["gbps"] > 0
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_block_size_mismatch_is_refused_naming_the_field(tiny_model_dir, collector):
    prefill = PrefillWorker(make_spec(tiny_model_dir, "prefill-0", "zmq", block_size=16))
    decode = DecodeWorker(make_spec(tiny_model_dir, "decode-0", "zmq", block_size=8))
    try:
        reqs = [request("mismatch", [5, 6, 7, 8], collector.address, 4)]
        asyncio.run(run_requests(prefill, decode, collector, reqs, block_size=8))
        final = collector.final("mismatch")
        assert final.finish_reason == "error"
        assert "block_size" in final.error and "16" in final.error and "8" in final.error
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_conditional_disaggregation_prefills_short_prompts_on_the_decode_worker(
    tiny_model_dir, hf_reference, collector
):
    prefill = PrefillWorker(make_spec(tiny_model_dir, "prefill-0", "zmq"))
    decode = DecodeWorker(make_spec(tiny_model_dir, "decode-0", "zmq"))
    try:
        batch = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32]]
        reqs = [request(f"cond-{i}", p, collector.address, 4) for i, p in enumerate(batch)]
        asyncio.run(run_requests(prefill, decode, collector, reqs, local_prefill_max_tokens=8))
        model = hf_reference(tiny_model_dir)
        for req, prompt in zip(reqs, batch, strict=True):
            assert collector.tokens(req.request_id) == hf_greedy(model, prompt, 4)
        short, long = (collector.chunks[r.request_id] for r in reqs)
        assert {c.worker_id for c in short} == {"decode-0"}  # never left the decode worker
        assert short[-1].timings.get("transfer_bytes") is None
        assert long[0].worker_id == "prefill-0" and long[-1].timings["transfer_bytes"] > 0
        assert decode.free_blocks() == decode.ready()["total_blocks"]
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_an_abort_mid_stream_ends_with_one_final_chunk_from_the_decode_worker(tiny_model_dir,
                                                                              collector):
    """The prefill worker sent token 1, the decode worker the rest: after the abort, the
    router's final chunk goes out from the decode worker, behind its last token."""
    prefill = PrefillWorker(make_spec(tiny_model_dir, "prefill-0", "zmq"))
    decode = DecodeWorker(make_spec(tiny_model_dir, "decode-0", "zmq"))

    async def scenario() -> None:
        core = RouterCore(RouterConfig(block_size=8, poll_interval_s=0.05))
        core.add_worker("prefill-0", "prefill", LocalHandle(prefill))
        core.add_worker("decode-0", "decode", LocalHandle(decode))
        await core.wait_ready(10)
        core.start()
        await core.submit(request("ab", [7] * 12, collector.address, 300))
        await asyncio.to_thread(collector.wait_tokens, "ab", 4)
        await core.abort("ab")
        await asyncio.to_thread(collector.wait_finished, ["ab"], 5)
        await core.stop()

    try:
        asyncio.run(scenario())
        time.sleep(0.3)  # anything late would be on the wire by now
        final = collector.final("ab")
        assert final.finish_reason == "abort" and final.worker_id == "decode-0"
        assert collector.chunks["ab"][-1] is final
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()
