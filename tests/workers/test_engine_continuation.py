"""A continuation (a request migrated after its worker was lost, docs/contracts.md
"Migration") on a fresh engine goes on exactly as the original would have: greedy and seeded
tokens, stop strings across the boundary, the streamed text, max_tokens counted from the
start; and the same through a reserve/commit on a decode-role engine."""

from __future__ import annotations

import dataclasses

import pytest

from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=77, ignore_eos=True)


def run(engine: LLMEngine, rid: str, prompt, params, output=(), sent=0):
    """Steps `rid` to its end; returns (token ids streamed, text streamed)."""
    engine.add_request(rid, prompt, params, output_token_ids=output, sent_text_len=sent)
    tokens, text = [], ""
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.text_delta
    return tokens, text


def streamed_until(engine: LLMEngine, prompt, params, k: int):
    """The first k tokens and the text streamed with them, as a gateway got them."""
    engine.add_request("head", prompt, params)
    tokens, text = [], ""
    while len(tokens) < k:
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.text_delta
    engine.abort("head")
    return tokens, text


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("k", [1, 5])
def test_continuation_draws_what_the_original_would_have(make_engine, random_prompts,
                                                         params, k):
    engine = make_engine()
    prompt = random_prompts(1, seed=21)[0]
    full, _ = run(engine, "full", prompt, params)
    rest, _ = run(make_engine(), "cont", prompt, params, output=full[:k])
    assert full[:k] + rest == full
    assert len(rest) == params.max_tokens - k  # max_tokens counts the output before it


def test_stop_string_across_the_boundary_and_the_streamed_text(make_engine):
    engine = make_engine()
    prompt = engine.tokenizer.encode("Once upon a time")
    _, text = run(engine, "plain", prompt, GREEDY)
    k = 4
    head, head_text = streamed_until(engine, prompt, GREEDY, k)
    boundary = len(engine.tokenizer.decode(head))
    stop = text[boundary - 2: boundary + 2]  # half before the migration, half after
    assert len(stop) == 4 and text.index(stop) == boundary - 2
    params = dataclasses.replace(GREEDY, stop=(stop,))
    original, original_text = run(engine, "orig", prompt, params)
    head, head_text = streamed_until(engine, prompt, params, k)
    rest, rest_text = run(make_engine(), "cont", prompt, params, output=head,
                          sent=len(head_text))
    assert head + rest == original
    assert head_text + rest_text == original_text == text[:boundary - 2]


def test_decode_role_continuation_from_a_reservation(make_engine, random_prompts):
    """What a decode worker does with a migrated request: reserve for prompt + output, the
    prefill's KV lands, commit the next token, decode the rest."""
    prompt = random_prompts(1, seed=22)[0]
    full, _ = run(make_engine(), "full", prompt, GREEDY)
    k = 3
    prefill = make_engine(role="prefill")
    decode = make_engine(role="decode")
    block_ids = decode.reserve_remote("c", prompt, GREEDY, output_token_ids=full[:k])
    prefill.add_request("c", prompt, GREEDY, output_token_ids=full[:k])
    (first,) = prefill.step()
    assert first.finish_reason == "prefill_done" and first.new_token_ids == [full[k]]
    held = prefill.held_block_ids("c")
    assert len(held) == len(block_ids)
    for layer, (k_cache, v_cache) in enumerate(prefill.kv_caches):
        decode.kv_caches[layer][0][block_ids] = k_cache[held]
        decode.kv_caches[layer][1][block_ids] = v_cache[held]
    prefill.release("c")
    decode.commit_remote("c", full[k])
    rest = []
    while decode.has_unfinished():
        rest += [t for out in decode.step() for t in out.new_token_ids]
    assert full[:k + 1] + rest == full
