"""LLMEngine on the tiny model (CPU, float32) against transformers, plus its error paths.

Every engine built here is checked after the test: all its KV blocks are free again.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random

import pytest
import torch

from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine import LLMEngine
from workers.errors import (
    EmptyPrompt,
    InvalidParameter,
    NoCapacity,
    PromptTooLong,
    UnknownRequest,
    UnknownTokenIds,
)
from workers.sampling_params import SamplingParams
from workers.tiny_model import VARIANTS

NUM_NEW = 8
GREEDY = SamplingParams(max_tokens=NUM_NEW, min_tokens=NUM_NEW, temperature=0)
"""min_tokens == max_tokens bans EOS on both sides (HF: min_new_tokens), so lengths match."""


def random_prompts(n: int, seed: int = 0, lengths=(3, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 512) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@functools.lru_cache(maxsize=64)
def _hf_greedy(model_dir: str, prompt: tuple[int, ...], num_new: int) -> tuple[int, ...]:
    model = _hf_model(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=num_new,
            min_new_tokens=num_new,
        )
    return tuple(out[0, len(prompt) :].tolist())


@functools.lru_cache(maxsize=16)
def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir, prompts: list[list[int]], num_new: int = NUM_NEW) -> list[list[int]]:
    return [list(_hf_greedy(str(model_dir), tuple(p), num_new)) for p in prompts]


@pytest.fixture
def make_engine(tiny_model_dir):
    """Builds engines on the tiny model; afterwards asserts none of them leaked a block."""
    engines: list[LLMEngine] = []

    def make(
        model_dir=None,
        num_blocks=256,
        block_size=4,
        role="colocated",
        device="cpu",
        attention_backend="torch",
        **sched,
    ):
        config = EngineConfig(
            model=str(model_dir or tiny_model_dir),
            dtype="float32",
            device=device,
            attention_backend=attention_backend,
            role=role,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
            scheduler=SchedulerConfig(**sched),
        )
        engines.append(LLMEngine(config))
        return engines[-1]

    yield make
    for engine in engines:
        assert not engine.has_unfinished()
        assert engine.num_free_blocks == engine.num_total_blocks, "KV blocks leaked"


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


def test_greedy_matches_transformers_one_prompt(make_engine, tiny_model_dir):
    engine = make_engine()
    prompt = random_prompts(1, seed=1)[0]
    (out,) = engine.generate([prompt], GREEDY)
    assert out.token_ids == hf_greedy(tiny_model_dir, [prompt])[0]
    assert out.finish_reason == "length" and out.num_prompt_tokens == len(prompt)


def test_greedy_matches_transformers_16_prompts_arriving_at_different_steps(
    make_engine, tiny_model_dir
):
    prompts = random_prompts(16, seed=2)
    engine = make_engine(max_num_batched_tokens=64)
    assert run_staggered(engine, prompts, GREEDY) == hf_greedy(tiny_model_dir, prompts)


def test_greedy_matches_transformers_with_small_prefill_chunks(make_engine, tiny_model_dir):
    prompts = random_prompts(6, seed=3, lengths=(10, 40))
    engine = make_engine(max_num_batched_tokens=16, long_prefill_token_threshold=5)
    assert run_staggered(engine, prompts, GREEDY, 2) == hf_greedy(tiny_model_dir, prompts)


def test_greedy_matches_transformers_with_preemption(make_engine, tiny_model_dir):
    prompts = random_prompts(6, seed=4, lengths=(6, 14))
    engine = make_engine(num_blocks=12, block_size=4)
    tokens = run_staggered(engine, prompts, GREEDY, arrive_every=1)
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert tokens == hf_greedy(tiny_model_dir, prompts)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_transformers_per_architecture(make_engine, make_model_dir, variant):
    model_dir = make_model_dir(variant)
    prompts = random_prompts(3, seed=5, lengths=(4, 20))
    engine = make_engine(model_dir=model_dir)
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, min_tokens=6, temperature=0))
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, prompts, 6)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="triton on CPU needs TRITON_INTERPRET=1"
)
def test_greedy_matches_transformers_on_triton_backend_in_interpreter(make_engine, tiny_model_dir):
    prompts = random_prompts(3, seed=13, lengths=(3, 20))
    engine = make_engine(attention_backend="triton", long_prefill_token_threshold=7)
    outs = engine.generate(prompts, SamplingParams(max_tokens=4, min_tokens=4, temperature=0))
    assert [o.token_ids for o in outs] == hf_greedy(tiny_model_dir, prompts, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_matches_transformers_on_cuda(make_engine, tiny_model_dir, backend):
    prompts = random_prompts(8, seed=14)
    engine = make_engine(device="cuda", attention_backend=backend, max_num_batched_tokens=64)
    assert run_staggered(engine, prompts, GREEDY) == hf_greedy(tiny_model_dir, prompts)


def test_seeded_sampling_is_reproducible_in_any_batch_mix(make_engine):
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


def test_stop_token_ids_and_min_tokens(make_engine):
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


def test_bad_input_raises_typed_errors_while_serving_others(make_engine, tiny_model_dir):
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
    assert finals["good"].token_ids == hf_greedy(tiny_model_dir, [prompt])[0]


def test_abort_in_any_phase_frees_blocks_and_spares_the_rest(make_engine, tiny_model_dir):
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
    assert finals == {"r2": hf_greedy(tiny_model_dir, [prompts[2]])[0]}


def test_outputs_carry_logprobs_and_phase_timings(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True)
    (out,) = engine.generate([random_prompts(1, seed=11)[0]], params)
    (entry,) = out.logprobs
    assert entry["token_id"] == out.token_ids[-1] and len(entry["top"]) == 2
    assert entry["top"][0][0] == entry["token_id"]  # greedy picks the top raw token
    m = out.metrics
    assert m.queue >= 0 and m.prefill > 0 and m.decode > 0


def copy_kv_blocks(src: LLMEngine, src_ids: list[int], dst: LLMEngine, dst_ids: list[int]):
    """The KV transfer, reduced to plain torch: block i of src lands in block i of dst."""
    for (k_src, v_src), (k_dst, v_dst) in zip(src.kv_caches, dst.kv_caches, strict=True):
        for s, d in zip(src_ids, dst_ids, strict=False):
            k_dst[d].copy_(k_src[s])
            v_dst[d].copy_(v_src[s])


def test_disaggregated_prefill_then_decode_equals_colocated_greedy(make_engine):
    prompts = random_prompts(5, seed=12)
    colocated = [o.token_ids for o in make_engine().generate(prompts, GREEDY)]
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
    while prefill.has_unfinished():
        for out in prefill.step():
            assert out.finished and out.finish_reason == "prefill_done"
            held = prefill.held_block_ids(out.request_id)
            copy_kv_blocks(prefill, held, decode, dest[out.request_id])
            prefill.release(out.request_id)
            decode.commit_remote(out.request_id, out.token_ids[0])
    assert prefill.num_free_blocks == prefill.num_total_blocks
    finals = {}
    while decode.has_unfinished():
        finals.update({o.request_id: o.token_ids for o in decode.step() if o.finished})
    assert [finals[f"r{i}"] for i in range(len(prompts))] == colocated


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
