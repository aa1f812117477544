"""The draft model's prefill is chunked like the target's: prompts longer than the step budget
are prefilled by the draft in forwards of at most max_num_batched_tokens tokens, colocated
(following the target's chunks) and on a 1P+1D decode worker (where the draft prefills the
prompt itself, chunk by chunk, while other sequences keep decoding); greedy output stays
the same as without speculation and as transformers."""

from __future__ import annotations

import random

from tests.workers.test_engine_disagg import decode_to_end, hand_over
from tests.workers.test_spec_engine import NUM_NEW, greedy
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.engine.step_input import StepInput

BUDGET = 16


def mixed_prompts(seed: int, num_long: int = 4) -> list[list[int]]:
    """num_long prompts of 2-4x the budget and four short ones."""
    rng = random.Random(seed)
    lengths = [rng.randint(2 * BUDGET, 4 * BUDGET) for _ in range(num_long)]
    lengths += [rng.randint(3, BUDGET - 4) for _ in range(4)]
    return [[rng.randrange(4, 512) for _ in range(n)] for n in lengths]


def record_draft_steps(engine: LLMEngine) -> list[StepInput]:
    """Every StepInput the draft's runner executes from now on (it still runs them)."""
    runner = engine.spec.proposer.runner
    steps: list[StepInput] = []
    execute = runner.execute

    def recording(step: StepInput, *args, **kwargs):
        steps.append(step)
        return execute(step, *args, **kwargs)

    runner.execute = recording
    return steps


def check_chunked_draft_prefill(steps: list[StepInput], prompts: dict[str, list[int]]) -> None:
    """No draft forward over the budget; each prompt's positions all prefilled by the draft,
    the long ones over several forwards."""
    assert steps and max(step.num_tokens for step in steps) <= BUDGET
    covered: dict[str, set[int]] = {rid: set() for rid in prompts}
    forwards: dict[str, int] = {rid: 0 for rid in prompts}
    for step in steps:
        for i, rid in enumerate(step.seq_ids):
            lo, hi = step.query_start_loc[i], step.query_start_loc[i + 1]
            prompt_positions = {p for p in step.positions[lo:hi] if p < len(prompts[rid])}
            covered[rid] |= prompt_positions
            forwards[rid] += bool(prompt_positions)
    for rid, prompt in prompts.items():
        assert covered[rid] == set(range(len(prompt))), rid
        if len(prompt) > BUDGET:
            assert forwards[rid] >= len(prompt) // BUDGET + 1, (rid, forwards[rid])


def test_colocated_draft_prefill_follows_the_targets_chunks(spec_engine, tiny_model_dir,
                                                            hf_greedy):
    """The target as its own draft: every draft is accepted only if the draft's chunked KV
    is right."""
    prompts = mixed_prompts(seed=21)
    engine = spec_engine("draft", 4, tiny_model_dir, max_num_batched_tokens=BUDGET)
    steps = record_draft_steps(engine)
    outs = [o.token_ids for o in engine.generate(prompts, greedy())]
    assert outs == [o.token_ids for o in spec_engine(
        max_num_batched_tokens=BUDGET).generate(prompts, greedy())]
    assert outs == hf_greedy(tiny_model_dir, prompts, NUM_NEW)
    totals = engine.spec.totals
    assert totals.num_drafts > 0
    assert totals.num_accepted_tokens == totals.num_draft_tokens
    check_chunked_draft_prefill(steps, {f"generate-{i}": p for i, p in enumerate(prompts)})


def test_colocated_draft_prefill_with_another_draft_model(spec_engine, tiny_model_dir,
                                                          draft_model_dir, hf_greedy):
    prompts = mixed_prompts(seed=22)
    engine = spec_engine("draft", 3, draft_model_dir, max_num_batched_tokens=BUDGET,
                         long_prefill_token_threshold=7)
    steps = record_draft_steps(engine)
    outs = [o.token_ids for o in engine.generate(prompts, greedy())]
    assert outs == hf_greedy(tiny_model_dir, prompts, NUM_NEW)
    check_chunked_draft_prefill(steps, {f"generate-{i}": p for i, p in enumerate(prompts)})


def test_decode_worker_prefills_the_draft_in_budgeted_chunks(spec_engine, tiny_model_dir,
                                                             hf_greedy):
    """1P+1D in one process: the decode worker gets the target's KV only and prefills the
    draft (the target itself) in chunks of at most the budget, one per step; short requests
    decode and draft in the same steps; output == transformers. Long requests draft nothing
    until their draft has caught up (budget tokens per step for all of them), so they get
    enough tokens to get there."""
    prompts = mixed_prompts(seed=23, num_long=2)
    params = SamplingParams(max_tokens=3 * NUM_NEW, min_tokens=3 * NUM_NEW, temperature=0)
    ids = [f"r{i}" for i in range(len(prompts))]
    prefill = spec_engine("draft", 4, tiny_model_dir, role="prefill", num_blocks=256,
                          max_num_batched_tokens=BUDGET)
    decode = spec_engine("draft", 4, tiny_model_dir, role="decode", num_blocks=256,
                         max_num_batched_tokens=BUDGET)
    steps = record_draft_steps(decode)
    dest = {rid: decode.reserve_remote(rid, p, params) for rid, p in zip(ids, prompts, strict=True)}
    for rid, prompt in zip(ids, prompts, strict=True):
        prefill.add_request(rid, prompt, params)
    hand_over(prefill, decode, dest)
    finals = decode_to_end(decode)
    expected = hf_greedy(tiny_model_dir, prompts, 3 * NUM_NEW)
    assert [finals[rid].token_ids for rid in ids] == expected
    totals = decode.spec.totals
    assert totals.num_drafts > 0 and totals.num_accepted_tokens == totals.num_draft_tokens
    check_chunked_draft_prefill(steps, dict(zip(ids, prompts, strict=True)))
    # While a long prompt's draft prefill was still in chunks, short requests drafted.
    long_ids = {rid for rid, p in zip(ids, prompts, strict=True) if len(p) > BUDGET}
    mixed = [step for step in steps
             if any(step.query_start_loc[i + 1] - step.query_start_loc[i] > 1
                    and rid in long_ids for i, rid in enumerate(step.seq_ids))
             and set(step.seq_ids) - long_ids]
    assert mixed
