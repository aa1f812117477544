"""LLMEngine on the tiny model (CPU, float32) against transformers, plus its error paths.

Every engine built by `make_engine` (tests/workers/conftest.py) is checked after the test:
no unfinished request, all its KV blocks free again.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.errors import EmptyPrompt, InvalidParameter, PromptTooLong, UnknownTokenIds
from workers.model.tiny_model import VARIANTS

NUM_NEW = 8
GREEDY = SamplingParams(max_tokens=NUM_NEW, min_tokens=NUM_NEW, temperature=0)
"""min_tokens == max_tokens bans EOS on both sides (HF: min_new_tokens), so lengths match."""


def run_staggered(engine: LLMEngine, prompts, params, arrive_every: int = 1) -> list[list[int]]:
    """Adds one prompt every `arrive_every` steps while stepping; returns each one's tokens."""
    pending = list(enumerate(prompts))
    finals: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % arrive_every == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.token_ids
        step += 1
    return [finals[f"r{i}"] for i in range(len(prompts))]


def test_greedy_matches_transformers_one_prompt(
    make_engine, tiny_model_dir, random_prompts, hf_greedy
):
    engine = make_engine()
    prompt = random_prompts(1, seed=1)[0]
    (out,) = engine.generate([prompt], GREEDY)
    assert out.token_ids == hf_greedy(tiny_model_dir, [prompt], NUM_NEW)[0]
    assert out.finish_reason == "length" and out.num_prompt_tokens == len(prompt)


def test_greedy_matches_transformers_16_prompts_arriving_at_different_steps(
    make_engine, tiny_model_dir, random_prompts, hf_greedy
):
    prompts = random_prompts(16, seed=2)
    engine = make_engine(max_num_batched_tokens=64)
    assert run_staggered(engine, prompts, GREEDY) == hf_greedy(tiny_model_dir, prompts, NUM_NEW)


def test_greedy_matches_transformers_with_small_prefill_chunks(
    make_engine, tiny_model_dir, random_prompts, hf_greedy
):
    prompts = random_prompts(6, seed=3, lengths=(10, 40))
    engine = make_engine(max_num_batched_tokens=16, long_prefill_token_threshold=5)
    assert run_staggered(engine, prompts, GREEDY, 2) == hf_greedy(tiny_model_dir, prompts, NUM_NEW)


def test_greedy_matches_transformers_with_preemption(
    make_engine, tiny_model_dir, random_prompts, hf_greedy
):
    prompts = random_prompts(6, seed=4, lengths=(6, 14))
    engine = make_engine(num_blocks=12, block_size=4)
    tokens = run_staggered(engine, prompts, GREEDY, arrive_every=1)
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert tokens == hf_greedy(tiny_model_dir, prompts, NUM_NEW)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_transformers_per_architecture(
    make_engine, make_model_dir, variant, random_prompts, hf_greedy
):
    model_dir = make_model_dir(variant)
    prompts = random_prompts(3, seed=5, lengths=(4, 20))
    engine = make_engine(model_dir=model_dir)
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, min_tokens=6, temperature=0))
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, prompts, 6)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="triton on CPU needs TRITON_INTERPRET=1"
)
def test_greedy_matches_transformers_on_triton_backend_in_interpreter(
    make_engine, tiny_model_dir, random_prompts, hf_greedy
):
    prompts = random_prompts(3, seed=13, lengths=(3, 20))
    engine = make_engine(attention_backend="triton", long_prefill_token_threshold=7)
    outs = engine.generate(prompts, SamplingParams(max_tokens=4, min_tokens=4, temperature=0))
    assert [o.token_ids for o in outs] == hf_greedy(tiny_model_dir, prompts, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_matches_transformers_on_cuda(
    make_engine, tiny_model_dir, backend, random_prompts, hf_greedy
):
    prompts = random_prompts(8, seed=14)
    engine = make_engine(device="cuda", attention_backend=backend, max_num_batched_tokens=64)
    assert run_staggered(engine, prompts, GREEDY) == hf_greedy(tiny_model_dir, prompts, NUM_NEW)


def test_seeded_sampling_is_reproducible_in_any_batch_mix(make_engine, random_prompts):
    engine = make_engine()
    prompt = random_prompts(1, seed=6)[0]
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    (alone,) = engine.generate([prompt], seeded)
    others = SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True)
    mixed = engine.generate(random_prompts(3, seed=7) + [prompt], [others] * 3 + [seeded])
    assert mixed[3].token_ids == alone.token_ids
    other_seed = engine.generate([prompt], dataclasses.replace(seeded, seed=99))[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_string_cuts_text_right_before_it(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    (full,) = engine.generate(["Once upon a time"], params)
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut_at = text.index(stop)
    engine.add_request(
        "s", engine.tokenizer.encode("Once upon a time"), dataclasses.replace(params, stop=(stop,))
    )
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.text_delta)
            final = out
    assert final.finish_reason == "stop" and final.text == text[:cut_at]
    assert "".join(deltas) == text[:cut_at]


def test_stop_token_ids_and_min_tokens(make_engine, random_prompts):
    engine = make_engine()
    prompt = random_prompts(1, seed=8)[0]
    (full,) = engine.generate([prompt], GREEDY)
    stop_id = full.token_ids[2]
    first = full.token_ids.index(stop_id)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0, stop_token_ids=(stop_id,))
    (out,) = engine.generate([prompt], params)
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: first + 1]
    banned = dataclasses.replace(params, min_tokens=NUM_NEW)
    (out,) = engine.generate([prompt], banned)
    assert out.finish_reason == "length" and stop_id not in out.token_ids


def test_bad_input_raises_typed_errors_while_serving_others(
    make_engine, tiny_model_dir, random_prompts, hf_greedy
):
    engine = make_engine(num_blocks=64, block_size=4)
    prompt = random_prompts(1, seed=9)[0]
    engine.add_request("good", prompt, GREEDY)
    engine.step()
    with pytest.raises(EmptyPrompt):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(PromptTooLong) as too_long:
        engine.add_request("long", [5] * 300, GREEDY)
    assert (too_long.value.length, too_long.value.max) == (300, 256)
    with pytest.raises(UnknownTokenIds) as unknown:
        engine.add_request("oov", [5, 512, -1], GREEDY)
    assert unknown.value.ids == [512, -1] and unknown.value.vocab_size == 512
    with pytest.raises(EmptyPrompt):  # generate is all or nothing
        engine.generate([[5, 6], []], GREEDY)
    assert [s.seq_id for s in engine.scheduler.running + list(engine.scheduler.waiting)] == ["good"]
    with pytest.raises(InvalidParameter) as bad:
        SamplingParams(temperature=-1)
    assert bad.value.field == "temperature"
    with pytest.raises(InvalidParameter) as bad:
        SamplingParams.from_dict({"max_tokens": 0})
    assert bad.value.field == "max_tokens"
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(finals) == ["good"]
    assert finals["good"].token_ids == hf_greedy(tiny_model_dir, [prompt], NUM_NEW)[0]


def test_abort_in_any_phase_frees_blocks_and_spares_the_rest(
    make_engine, tiny_model_dir, random_prompts, hf_greedy
):
    prompts = random_prompts(4, seed=10, lengths=(20, 30))  # lengths 29, 25, 23, 23
    engine = make_engine(max_num_batched_tokens=32, max_num_seqs=3)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY)
    engine.step()
    seqs = engine.scheduler
    phase = {s.seq_id: (s.num_computed_tokens, s.num_output_tokens) for s in seqs.running}
    assert phase == {"r0": (29, 1), "r1": (3, 0)} and len(seqs.waiting) == 2
    engine.abort("r1")  # mid-prefill
    engine.abort("r3")  # still waiting
    engine.step()
    assert [s.seq_id for s in seqs.running] == ["r0", "r2"]
    engine.abort("r0")  # decoding
    engine.abort("r0")  # idempotent
    engine.abort("never-added")
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert finals == {"r2": hf_greedy(tiny_model_dir, [prompts[2]], NUM_NEW)[0]}


def test_outputs_carry_logprobs_and_phase_timings(make_engine, random_prompts):
    engine = make_engine()
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True)
    (out,) = engine.generate([random_prompts(1, seed=11)[0]], params)
    (entry,) = out.logprobs
    assert entry["token_id"] == out.token_ids[-1] and len(entry["top"]) == 2
    assert entry["top"][0][0] == entry["token_id"]  # greedy picks the top raw token
    m = out.metrics
    assert m.queue >= 0 and m.prefill > 0 and m.decode > 0


def test_repetition_penalty_matches_transformers(
    make_engine, tiny_model_dir, random_prompts, hf_greedy
):
    prompts = random_prompts(3, seed=15, lengths=(4, 12))
    engine = make_engine()
    params = dataclasses.replace(GREEDY, repetition_penalty=1.8)
    outs = engine.generate(prompts, params)
    expected = hf_greedy(tiny_model_dir, prompts, NUM_NEW, repetition_penalty=1.8)
    assert [o.token_ids for o in outs] == expected
    assert expected != hf_greedy(tiny_model_dir, prompts, NUM_NEW)  # the penalty mattered


def test_logprobs_match_transformers_raw_logits(make_engine, tiny_model_dir, hf_reference):
    prompt = [7, 99, 23, 311, 42]
    engine = make_engine()
    engine.add_request("lp", prompt, dataclasses.replace(GREEDY, logprobs=3))
    entries = []
    while engine.has_unfinished():
        entries += [e for out in engine.step() for e in out.logprobs]
    with torch.no_grad():
        out = hf_reference(tiny_model_dir).generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NUM_NEW,
            min_new_tokens=NUM_NEW,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert [e["token_id"] for e in entries] == out.sequences[0, len(prompt) :].tolist()
    for entry, logits in zip(entries, out.logits, strict=True):
        expected = torch.log_softmax(logits[0].float(), dim=-1)
        assert entry["logprob"] == pytest.approx(float(expected[entry["token_id"]]), abs=1e-4)
        top_values, top_ids = expected.topk(3)
        assert [t for t, _ in entry["top"]] == top_ids.tolist()
        assert [v for _, v in entry["top"]] == pytest.approx(top_values.tolist(), abs=1e-4)
