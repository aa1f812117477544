"""SmolLM2-135M-Instruct (GGUF) on 1 prefill + 1 decode worker in-process over gloo: greedy
tokens equal transformers' on the same GGUF file (float32) for plain prompts and a chat
prompt, the chat answer names Paris, and every block is free again on both workers."""

from __future__ import annotations

import asyncio

import pytest

from tests.cluster.helpers import ChunkCollector
from tests.cluster.test_disaggregated_workers import (
    make_spec,
    request,
    run_requests,
    wait_all_free,
)
from tests.smollm2 import MAX_TOKENS, reference, smollm2_path
from workers.actors.decode_worker import DecodeWorker
from workers.actors.prefill_worker import PrefillWorker

# The first test to ask for the transformers reference loads the GGUF file through the gguf
# package's reader: ~25 s on 2 idle cores, minutes on 2 busy ones.
pytestmark = pytest.mark.timeout(900)


def test_disaggregated_smollm2_matches_transformers():
    path = smollm2_path()
    expected = reference()
    collector = ChunkCollector()
    prefill = PrefillWorker(make_spec(path, "prefill-0", "gloo"))
    decode = DecodeWorker(make_spec(path, "decode-0", "gloo"))
    try:
        reqs = {label: request(f"smollm2-{i}", ids, collector.address, MAX_TOKENS)
                for i, (label, (ids, _)) in enumerate(expected.items())}
        asyncio.run(run_requests(prefill, decode, collector, list(reqs.values())))
        for label, req in reqs.items():
            assert collector.tokens(req.request_id) == expected[label][1], label
            assert collector.final(req.request_id).timings["transfer_bytes"] > 0
        chat = "".join(c.text_delta for c in collector.chunks[reqs["chat"].request_id])
        assert "Paris" in chat
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()
        collector.close()
