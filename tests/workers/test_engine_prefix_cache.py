"""Prefix caching in LLMEngine: greedy output with caching on equals caching off equals
transformers, for shared prefixes (whole and partial blocks), under eviction and preemption;
hits are counted and reported as cached tokens; a decode-role reservation shares the blocks
it has cached and needs only the rest copied in; speculative decoding names only blocks of
accepted tokens. Every engine ends with every block free
(the make_engine fixture)."""

from __future__ import annotations

import random

import pytest

from tests.workers.test_engine_disagg import copy_kv_blocks
from workers.engine.sampling_params import SamplingParams
from workers.errors import NoCapacity

GREEDY = SamplingParams(max_tokens=6, min_tokens=6, temperature=0)


def shared_prefix_prompts(n: int, prefix_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(4, 512) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(4, 512) for _ in range(rng.randint(1, 9))]
            for _ in range(n)]


def run_one_by_one(engine, prompts) -> list[list[int]]:
    return [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_greedy_shared_prefixes_caching_on_equals_off_equals_transformers(
        make_engine, hf_greedy, tiny_model_dir):
    """A 22-token prefix (5 full blocks of 4 and a partial one): later prompts share the
    full blocks, the partial block is computed again; outputs are unchanged."""
    prompts = shared_prefix_prompts(5, prefix_len=22, seed=1)
    expected = hf_greedy(tiny_model_dir, prompts, 6)
    on = make_engine()
    assert run_one_by_one(on, prompts) == expected
    assert run_one_by_one(make_engine(prefix_caching=False), prompts) == expected
    cache = on.prefix_cache
    assert cache.num_hits >= 4 * 20  # every prompt after the first: 5 blocks of 4
    assert 0 < cache.num_hits < cache.num_queries
    # Reported per request: the cached part of its prompt.
    again = on.generate([prompts[0]], GREEDY)[0]
    assert again.token_ids == expected[0]
    assert again.num_cached_tokens == (len(prompts[0]) - 1) // 4 * 4


def test_batched_shared_prefixes_in_one_step_equal_transformers(make_engine, hf_greedy,
                                                                tiny_model_dir):
    """Prompts that arrive together share nothing yet (their blocks are named only once
    computed); the next wave shares their blocks while the first still decodes."""
    prompts = shared_prefix_prompts(6, prefix_len=13, seed=2)
    expected = hf_greedy(tiny_model_dir, prompts, 6)
    engine = make_engine()
    for i, prompt in enumerate(prompts[:3]):
        engine.add_request(f"a{i}", prompt, GREEDY)
    engine.step()  # the first wave's prompts are computed and named
    for i, prompt in enumerate(prompts[3:]):
        engine.add_request(f"b{i}", prompt, GREEDY)
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    ids = [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(3)]
    assert [finals[i].token_ids for i in ids] == expected
    assert [finals[i].num_cached_tokens for i in ids] == [0, 0, 0, 12, 12, 12]


def test_a_prompt_of_whole_blocks_still_computes_its_last_token(make_engine, hf_greedy,
                                                                 tiny_model_dir):
    prompt = shared_prefix_prompts(1, prefix_len=16, seed=3)[0][:16]
    expected = hf_greedy(tiny_model_dir, [prompt], 6)
    engine = make_engine()
    first, second = (engine.generate([prompt], GREEDY)[0] for _ in range(2))
    assert first.token_ids == second.token_ids == expected[0]
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 12)


def test_eviction_under_pressure_keeps_outputs_exact(make_engine, hf_greedy, tiny_model_dir):
    """A pool of 12 blocks holds about one request: each new prompt evicts the last one's
    cached blocks (removed events), and an evicted prefix is simply computed again."""
    prompts = shared_prefix_prompts(3, prefix_len=17, seed=4)
    prompts += [list(reversed(p)) for p in prompts]
    expected = hf_greedy(tiny_model_dir, prompts, 6)
    engine = make_engine(num_blocks=12)
    assert run_one_by_one(engine, prompts + prompts[:2]) == expected + expected[:2]
    kinds = [e.kind for e in engine.prefix_cache.drain_events().events]
    assert kinds.count("removed") > 0 and kinds.count("stored") > kinds.count("removed")
    assert engine.prefix_cache.num_named <= 12


def test_preemption_with_shared_prefixes_equals_transformers(make_engine, hf_greedy,
                                                             tiny_model_dir):
    """A pool too small for the batch: sequences are preempted, and on readmission they
    find their own (and their neighbours') blocks in the cache."""
    prompts = shared_prefix_prompts(6, prefix_len=14, seed=5)
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0)
    expected = hf_greedy(tiny_model_dir, prompts, 16)
    engine = make_engine(num_blocks=20)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.prefix_cache.num_hits > 0


def test_abort_of_one_reader_keeps_the_shared_blocks_for_the_other(make_engine, hf_greedy,
                                                                   tiny_model_dir):
    prompts = shared_prefix_prompts(2, prefix_len=12, seed=6)
    expected = hf_greedy(tiny_model_dir, prompts[1:], 6)
    engine = make_engine(num_blocks=16)
    engine.generate([prompts[0]], GREEDY)
    engine.add_request("reader", prompts[1], GREEDY)
    engine.add_request("aborted", prompts[1], GREEDY)
    engine.step()
    shared = engine.scheduler.running[0].block_table[:3]
    assert shared == engine.scheduler.running[1].block_table[:3]
    engine.abort("aborted")
    assert not any(engine.pool.is_free(b) for b in shared)
    # Take every other block: the held shared ones are not evicted from under the reader.
    others = engine.pool.allocate(engine.pool.num_free)
    assert not set(others) & set(shared)
    engine.pool.free(others)
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals["reader"].token_ids == expected[0]


def test_decode_reservation_shares_cached_blocks_and_receives_only_the_rest(
        make_engine, hf_greedy, tiny_model_dir):
    """A second chat turn on a decode-role engine: the first turn's blocks (prompt and
    output, named as they were decoded) are shared by the reservation; only the new turn's
    blocks are copied from the prefill engine."""
    turn1 = shared_prefix_prompts(1, prefix_len=15, seed=7)[0]
    prefill = make_engine(role="prefill")
    decode = make_engine(role="decode")

    def disaggregated(rid: str, prompt: list[int]) -> tuple[list[int], int]:
        dest = decode.reserve_remote(rid, prompt, GREEDY)
        cached = decode.reserved_cached_tokens(rid)
        (first,) = [o for o in prefill.generate([prompt], GREEDY)]
        skip = cached // 4
        copy_kv_blocks(prefill, prefill.held_block_ids(first.request_id)[skip:], decode,
                       dest[skip:])
        prefill.release(first.request_id)
        decode.commit_remote(rid, first.token_ids[0])
        out = None
        while decode.has_unfinished():
            out = next((o for o in decode.step() if o.finished), out)
        return out.token_ids, cached

    first_out, first_cached = disaggregated("turn1", turn1)
    turn2 = turn1 + first_out + [7, 8, 9, 10, 11]
    second_out, second_cached = disaggregated("turn2", turn2)
    assert first_cached == 0
    # Turn 1's prompt and the output blocks whose KV was computed (all but the last token).
    assert second_cached == (len(turn1) + len(first_out) - 1) // 4 * 4
    assert [first_out, second_out] == hf_greedy(tiny_model_dir, [turn1, turn2], 6)


def test_reservation_refused_for_capacity_leaves_the_cache_as_it_was(make_engine):
    decode = make_engine(role="decode", num_blocks=8)
    prompt = list(range(4, 20))
    decode.reserve_remote("a", prompt, GREEDY)
    decode.commit_remote("a", 5)
    decode.abort("a")  # its 4 full prompt blocks stay cached
    decode.reserve_remote("c", list(range(100, 108)), GREEDY)  # 3 of the 4 unnamed blocks
    with pytest.raises(NoCapacity) as err:  # shares 4 cached blocks, 4 more do not fit
        decode.reserve_remote("b", prompt + list(range(30, 42)), GREEDY)
    assert err.value.free_blocks == 5
    assert decode.num_free_blocks == 5 and decode.prefix_cache.num_parked == 4
    decode.abort("c")


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculation_names_only_accepted_tokens_blocks(
        proposer, spec_engine, draft_model_dir, hf_greedy, tiny_model_dir):  # noqa: F811
    """Speculative decoding with prefix caching: a second turn that extends the first one's
    output shares the blocks the first turn filled while verifying drafts (a draft model of
    other random weights: most rejected) and still equals transformers. (Naming happens
    after verification's rollback; on this tiny random model one wrong KV slot need not flip
    a greedy token, so the ordering itself is shown by the scheduler's code, not here.)"""
    method, k = (("ngram", 3), ("draft", 4))[proposer == "draft"]
    engine = spec_engine(method, k, draft_model_dir if method == "draft" else None)
    phrase = [11, 12, 13, 14, 15, 16]
    turn1 = (phrase * 4)[:24]  # the last output token fills a block
    params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0)
    out1 = engine.generate([turn1], params)[0].token_ids
    turn2 = turn1 + out1 + [7, 8, 9]
    second = engine.generate([turn2], params)[0]
    assert [out1, second.token_ids] == hf_greedy(tiny_model_dir, [turn1, turn2], 12)
    assert second.num_cached_tokens == (len(turn1) + len(out1) - 1) // 4 * 4
    assert engine.spec.totals.num_drafts > 0
