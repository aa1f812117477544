"""Prefix caching under disaggregation (1 prefill + 1 decode worker in-process, real gloo and
ZMQ KV paths): a second chat turn moves only the blocks the decode worker does not hold
(the transfer's bytes say so), the prefill worker skips what it has cached, and the output
still equals transformers'."""

from __future__ import annotations

import asyncio

import pytest

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
