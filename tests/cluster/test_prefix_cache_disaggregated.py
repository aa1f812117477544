"""Prefix caching under disaggregation (1 prefill + 1 decode worker in-process, real gloo and
ZMQ KV paths): a second chat turn moves only the blocks the decode worker does not hold
(the transfer's bytes say so), the prefill worker skips what it has cached, mostly-cached
prompts and prompts behind a long prefill queue are prefilled on the decode worker, and the
output still equals transformers'."""

from __future__ import annotations

import asyncio

import pytest

from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import LocalHandle
from tests.cluster.helpers import ChunkCollector, hf_greedy, prompts
from tests.cluster.test_disaggregated_workers import (
    make_spec,
    request,
    run_requests,
    wait_all_free,
)
from workers.actors.decode_worker import DecodeWorker
from workers.actors.kv_endpoint import kv_layout
from workers.actors.prefill_worker import PrefillWorker

BLOCK = 8


def block_bytes(worker) -> int:
    layout = kv_layout(worker.engine)
    layers = layout.layer_end - layout.layer_start
    return 2 * layers * BLOCK * layout.num_kv_heads * layout.head_dim * layout.element_size


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()


@pytest.mark.parametrize("transport", ["gloo", "zmq"])
def test_second_chat_turn_moves_only_the_new_blocks(transport, tiny_model_dir, hf_reference,
                                                    collector):
    prefill = PrefillWorker(make_spec(tiny_model_dir, "prefill-0", transport))
    decode = DecodeWorker(make_spec(tiny_model_dir, "decode-0", transport))
    try:
        vocab = prefill.ready()["vocab_size"]
        turn1 = prompts(1, vocab, seed=5, low=30, high=31)[0]
        first = request(f"{transport}-turn1", turn1, collector.address, 9)
        asyncio.run(run_requests(prefill, decode, collector, [first]))
        out1 = collector.tokens(first.request_id)
        turn2 = turn1 + out1 + prompts(1, vocab, seed=6, low=12, high=13)[0]
        second = request(f"{transport}-turn2", turn2, collector.address, 5)
        asyncio.run(run_requests(prefill, decode, collector, [second]))

        model = hf_reference(tiny_model_dir)
        assert out1 == hf_greedy(model, turn1, 9)
        assert collector.tokens(second.request_id) == hf_greedy(model, turn2, 5)
        final1, final2 = collector.final(first.request_id), collector.final(second.request_id)
        # Turn 1 moves every block of its prompt. Turn 2: the decode worker holds turn 1's
        # prompt and the output it computed (all but the last token), in full blocks.
        decode_cached = (len(turn1) + len(out1) - 1) // BLOCK
        sent_blocks = -(-len(turn2) // BLOCK) - decode_cached
        assert final1.timings["transfer_bytes"] == -(-len(turn1) // BLOCK) * block_bytes(decode)
        assert final2.timings["transfer_bytes"] == sent_blocks * block_bytes(decode)
        assert sent_blocks < -(-len(turn2) // BLOCK) / 2
        # The prefill worker computed only what its cache lacked: turn 1's prompt blocks.
        assert final1.num_cached_tokens == 0
        assert final2.num_cached_tokens == len(turn1) // BLOCK * BLOCK
        assert prefill.engine.prefix_cache.num_hits >= len(turn1) // BLOCK * BLOCK
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()


@pytest.mark.parametrize("transport", ["gloo", "zmq"])
def test_blocks_cached_only_on_the_prefill_worker_are_still_sent(transport, tiny_model_dir,
                                                                 hf_reference, collector):
    """The prefill worker skips computing its cached prefix, but a decode worker that lacks
    it (here a fresh one) still receives every block: the stream's first step carries the
    cached blocks too."""
    prefill = PrefillWorker(make_spec(tiny_model_dir, "prefill-0", transport, chunk=11))
    decodes = [DecodeWorker(make_spec(tiny_model_dir, "decode-0", transport))]
    try:
        vocab = prefill.ready()["vocab_size"]
        shared = prompts(1, vocab, seed=7, low=26, high=27)[0]
        reqs = [request(f"{transport}-{i}", shared + [100 + i, 200 + i], collector.address, 6)
                for i in range(2)]
        asyncio.run(run_requests(prefill, decodes[0], collector, reqs[:1]))
        decodes.append(DecodeWorker(make_spec(tiny_model_dir, "decode-0", transport)))
        asyncio.run(run_requests(prefill, decodes[1], collector, reqs[1:]))
        model = hf_reference(tiny_model_dir)
        for req in reqs:
            assert collector.tokens(req.request_id) == hf_greedy(model, req.prompt_token_ids, 6)
        final = collector.final(reqs[1].request_id)
        assert final.num_cached_tokens == len(shared) // BLOCK * BLOCK
        wait_all_free(prefill, *decodes)
    finally:
        prefill.shutdown()
        for decode in decodes:
            decode.shutdown()


async def submit_in_turn(prefill, decode, collector, turns, **config) -> None:
    """One router for every turn: each is submitted once the last finished and its KV events
    reached the router's index. Each item of `turns` is a list submitted back to back."""
    core = RouterCore(RouterConfig(block_size=BLOCK, poll_interval_s=0.05, **config))
    core.add_worker("prefill-0", "prefill", LocalHandle(prefill))
    core.add_worker("decode-0", "decode", LocalHandle(decode))
    await core.wait_ready(10)
    core.start()
    for reqs in turns:
        for req in reqs:
            await core.submit(req)
        await asyncio.to_thread(collector.wait_finished, [r.request_id for r in reqs], 60)
        await asyncio.sleep(0.3)
    await core.stop()


def test_mostly_cached_prompts_and_long_prefill_queues_prefill_on_the_decode_worker(
        tiny_model_dir, hf_reference, collector):
    """Conditional disaggregation by cached overlap: a second turn whose uncached part is
    short runs whole on the decode worker that holds the first; by queue state: with a
    prefill queue at its limit, the next request is prefilled by the decode worker."""
    prefill = PrefillWorker(make_spec(tiny_model_dir, "prefill-0", "zmq"))
    decode = DecodeWorker(make_spec(tiny_model_dir, "decode-0", "zmq"))
    try:
        vocab = prefill.ready()["vocab_size"]
        turn1 = prompts(1, vocab, seed=8, low=32, high=33)[0]
        first = request("cached-turn1", turn1, collector.address, 8)
        model = hf_reference(tiny_model_dir)
        out1 = hf_greedy(model, turn1, 8)
        turn2 = turn1 + out1 + [7, 8, 9]  # 43 tokens, 32 cached on decode-0: 11 to compute
        second = request("cached-turn2", turn2, collector.address, 4)
        asyncio.run(submit_in_turn(prefill, decode, collector, [[first], [second]],
                                   local_prefill_max_tokens=12, decode_policy="cache_aware"))
        assert collector.tokens(first.request_id) == out1
        assert collector.tokens(second.request_id) == hf_greedy(model, turn2, 4)
        assert collector.chunks[first.request_id][0].worker_id == "prefill-0"
        assert {c.worker_id for c in collector.chunks[second.request_id]} == {"decode-0"}
        assert collector.final(second.request_id).num_cached_tokens == 32

        queued = [request(f"queued-{i}", p, collector.address, 4)
                  for i, p in enumerate(prompts(2, vocab, seed=9, low=20, high=24))]
        asyncio.run(submit_in_turn(prefill, decode, collector, [queued],
                                   max_prefill_queue_tokens=1))
        for req in queued:
            assert collector.tokens(req.request_id) == hf_greedy(model, req.prompt_token_ids, 4)
        assert collector.chunks["queued-0"][0].worker_id == "prefill-0"
        assert {c.worker_id for c in collector.chunks["queued-1"]} == {"decode-0"}
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()
