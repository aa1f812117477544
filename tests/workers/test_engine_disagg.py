"""Disaggregation hooks of LLMEngine: a prefill-role and a decode-role engine in one process,
the KV copied block by block with plain torch, give exactly the colocated greedy output.

This is the contract the cluster's prefill/decode workers rely on (docs/contracts.md).
"""

from __future__ import annotations

import pytest

from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.errors import InvalidParameter, NoCapacity, UnknownRequest

GREEDY = SamplingParams(max_tokens=8, min_tokens=8, temperature=0)


def copy_kv_blocks(src: LLMEngine, src_ids: list[int], dst: LLMEngine, dst_ids: list[int]):
    """The KV transfer, reduced to plain torch: block i of src lands in block i of dst."""
    for (k_src, v_src), (k_dst, v_dst) in zip(src.kv_caches, dst.kv_caches, strict=True):
        for s, d in zip(src_ids, dst_ids, strict=False):
            k_dst[d].copy_(k_src[s])
            v_dst[d].copy_(v_src[s])


def hand_over(prefill: LLMEngine, decode: LLMEngine, dest: dict[str, list[int]]) -> list:
    """Runs `prefill` to the end; each request's KV goes into the blocks `decode` reserved
    for it (`dest`), then decode commits it. The prefill side's outputs, in order."""
    outs = []
    while prefill.has_unfinished():
        for out in prefill.step():
            outs.append(out)
            copy_kv_blocks(prefill, prefill.held_block_ids(out.request_id), decode,
                           dest[out.request_id])
            prefill.release(out.request_id)
            decode.commit_remote(out.request_id, out.token_ids[0])
    return outs


def decode_to_end(decode: LLMEngine) -> dict:
    """Steps `decode` until nothing is left; the final output of each request by id."""
    finals = {}
    while decode.has_unfinished():
        finals.update({o.request_id: o for o in decode.step() if o.finished})
    return finals


def test_disaggregated_prefill_then_decode_equals_colocated_greedy(make_engine, random_prompts):
    prompts = random_prompts(5, seed=12)
    colocated_outs = make_engine().generate(prompts, GREEDY)
    colocated = [o.token_ids for o in colocated_outs]
    prefill = make_engine(role="prefill", num_blocks=64, long_prefill_token_threshold=7)
    decode = make_engine(role="decode", num_blocks=96)
    decoy = decode.reserve_remote("decoy", [5] * 9, GREEDY)  # so block ids differ per side
    dest = {f"r{i}": decode.reserve_remote(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)}
    decode.abort("decoy")  # an abort before commit frees the reservation
    assert decode.num_free_blocks == 96 - sum(map(len, dest.values()))
    assert len(decoy) == 3 and all(
        len(dest[f"r{i}"]) == len(p) // 4 + 1 for i, p in enumerate(prompts)
    )
    for i, prompt in enumerate(prompts):
        prefill.add_request(f"r{i}", prompt, GREEDY)
    handed = hand_over(prefill, decode, dest)
    assert all(out.finished and out.finish_reason == "prefill_done" for out in handed)
    texts = {out.request_id: out.text_delta for out in handed}
    assert prefill.num_free_blocks == prefill.num_total_blocks
    finals = {}
    while decode.has_unfinished():
        for out in decode.step():
            texts[out.request_id] += out.text_delta
            if out.finished:
                finals[out.request_id] = out.token_ids
    assert [finals[f"r{i}"] for i in range(len(prompts))] == colocated
    # Token 1's text streamed by the prefill side plus the decode side's deltas is exactly
    # the colocated text: nothing flushed early at the handoff, nothing streamed twice.
    assert [texts[f"r{i}"] for i in range(len(prompts))] == [o.text for o in colocated_outs]


def test_disaggregation_edges_no_capacity_and_first_token_finish(make_engine):
    decode = make_engine(role="decode", num_blocks=4, block_size=4)
    with pytest.raises(NoCapacity) as err:
        decode.reserve_remote("big", [5] * 16, GREEDY)  # 16 + 1 slots need 5 blocks
    assert (err.value.needed_blocks, err.value.free_blocks) == (5, 4)
    with pytest.raises(UnknownRequest):
        decode.commit_remote("never-reserved", 7)
    prefill = make_engine(role="prefill")
    (out,) = prefill.generate([[5, 6, 7]], SamplingParams(max_tokens=1, temperature=0))
    assert out.finish_reason == "length"  # nothing left to decode: no blocks are held
    with pytest.raises(UnknownRequest):
        prefill.held_block_ids(out.request_id)
    prefill.release(out.request_id)  # idempotent


def test_priority_reaches_both_roles_and_is_refused_under_fcfs(make_engine):
    """Under `--scheduling-policy priority` a request's priority ranks it on the prefill
    engine and on the decode engine that reserves for it; under fcfs (where it would be
    ignored) a non-zero priority is refused by name."""
    prefill = make_engine(role="prefill", policy="priority")
    decode = make_engine(role="decode", policy="priority")
    decode.reserve_remote("r1", [5, 6, 7], GREEDY, priority=-4)
    prefill.add_request("r1", [5, 6, 7], GREEDY, priority=-4)
    assert decode.requests.get("r1").priority == prefill.requests.get("r1").priority == -4
    decode.abort("r1")
    prefill.abort("r1")
    fcfs = make_engine(role="decode")  # both admissions: add_request and reserve_remote
    for admit in (fcfs.add_request, fcfs.reserve_remote):
        with pytest.raises(InvalidParameter) as refused:
            admit("r2", [5, 6], GREEDY, priority=1)
        assert refused.value.field == "priority"
    fcfs.add_request("r3", [5, 6], GREEDY, priority=0)
    fcfs.abort("r3")


def test_stop_token_ids_outside_the_vocabulary_are_refused(make_engine):
    engine = make_engine()
    vocab = engine.model_config.vocab_size
    with pytest.raises(InvalidParameter) as refused:
        engine.add_request("r1", [5, 6], SamplingParams(stop_token_ids=[vocab]))
    assert refused.value.field == "stop_token_ids" and str(vocab) in str(refused.value)
    engine.add_request("r2", [5, 6], SamplingParams(max_tokens=2, stop_token_ids=[vocab - 1]))
    engine.abort("r2")
