"""Speculative decoding inside the engine: greedy output with each proposer is token-for-token
what it is without speculation and what transformers gives (mixed per-request K, chunked
prefill, preemption), sampling keeps the target's distribution, disaggregated acceptance
equals colocated, and aborts between proposal and verification leak no block."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.workers.test_engine_disagg import decode_to_end, hand_over
from tests.workers.test_spec import chi_square_p_value
from workers.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.errors import InvalidParameter
from workers.model.tiny_model import make_tiny_model
from workers.spec.medusa import make_random_medusa

NUM_NEW = 12


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so the n-gram proposer has something to propose."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        phrase = [rng.randrange(4, 512) for _ in range(rng.randint(2, 9))]
        prompts.append((phrase * rng.randint(1, 4))[: rng.randint(3, 40)] or phrase)
    return prompts


def greedy(k: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=NUM_NEW, min_tokens=NUM_NEW, temperature=0,
                          num_speculative_tokens=k)


PROPOSERS = {
    "ngram": ("ngram", 3, None),
    "draft": ("draft", 4, "draft_model_dir"),
    "self-draft": ("draft", 5, "tiny_model_dir"),
}


@pytest.mark.parametrize("name", sorted(PROPOSERS))
def test_greedy_with_speculation_equals_without_and_transformers(
    name, request, spec_engine, tiny_model_dir, hf_greedy
):
    """16 concurrent requests, per-request K from 0 to 7, chunked prefill of 7 tokens."""
    method, k, draft_fixture = PROPOSERS[name]
    draft = request.getfixturevalue(draft_fixture) if draft_fixture else None
    prompts = repetitive_prompts(16, seed=3)
    params = [greedy(i % 8 if i % 3 else None) for i in range(16)]
    engine = spec_engine(method, k, draft, long_prefill_token_threshold=7)
    outs = [o.token_ids for o in engine.generate(prompts, params)]
    assert outs == [o.token_ids for o in spec_engine().generate(prompts, greedy())]
    assert outs == hf_greedy(tiny_model_dir, prompts, NUM_NEW)
    totals = engine.spec.totals
    assert totals.num_drafts > 0
    if name == "ngram":  # repeated phrases: some drafts hit (two random models agree on none)
        assert totals.num_accepted_tokens > 0
    if name == "self-draft":  # the target as its own draft: everything is accepted
        assert totals.num_accepted_tokens == totals.num_draft_tokens


def test_greedy_with_speculation_under_preemption(spec_engine, draft_model_dir,
                                                  tiny_model_dir, hf_greedy):
    """A pool too small for all sequences: preempted ones (lookahead blocks and draft KV
    gone) are recomputed and still give transformers' tokens."""
    prompts = repetitive_prompts(10, seed=5)
    engine = spec_engine("draft", 4, draft_model_dir, num_blocks=40)
    outs = [o.token_ids for o in engine.generate(prompts, greedy())]
    assert engine.scheduler.num_preemptions > 0
    assert outs == hf_greedy(tiny_model_dir, prompts, NUM_NEW)


def test_stop_inside_a_verification_run_drops_the_tokens_after_it(spec_engine,
                                                                   tiny_model_dir):
    """max_tokens and a stop token that fall inside an accepted run end the output exactly
    where plain decoding ends it."""
    prompt = repetitive_prompts(1, seed=9)[0]
    plain = spec_engine().generate([prompt], greedy())[0].token_ids
    engine = spec_engine("draft", 7, tiny_model_dir)
    for params in (SamplingParams(max_tokens=5, temperature=0),
                   SamplingParams(max_tokens=NUM_NEW, temperature=0,
                                  stop_token_ids=(plain[6],))):
        (out,) = engine.generate([prompt], params)
        expected = plain[: plain.index(plain[6]) + 1] if params.stop_token_ids else plain[:5]
        assert out.token_ids == expected


def test_aborts_between_proposal_and_verification_free_every_block(spec_engine,
                                                                   draft_model_dir):
    engine = spec_engine("draft", 6, draft_model_dir, num_blocks=128)
    prompts = repetitive_prompts(12, seed=7)
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=1)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    # Drafts proposed, lookahead slots taken and draft KV written; then aborts.
    engine.spec.propose(engine.scheduler.running)
    assert any(seq.spec_token_ids for seq in engine.scheduler.running)
    for i in range(0, 12, 2):
        engine.abort(f"r{i}")
    engine.step()  # verifies the others
    engine.spec.propose(engine.scheduler.running)
    for i in range(1, 12, 2):
        engine.abort(f"r{i}")
    assert not engine.has_unfinished()
    assert engine.num_free_blocks == engine.num_total_blocks


@pytest.mark.slow
def test_speculative_sampling_matches_the_target_distribution(spec_engine, tiny_model_dir,
                                                              draft_model_dir, hf_reference):
    """Temperature 1, top-k 8: the first token after prefill (k = 1 draft from the other
    tiny checkpoint, verified by rejection sampling) over 400 seeded requests follows the
    target's exact marginal sum_t0 p(t0) p(t1 | t0) (chi-square; fixed seeds, deterministic)."""
    prompt, n = [17, 230, 41, 99, 5], 400
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=8, seed=s, ignore_eos=True)
              for s in range(n)]
    engine = spec_engine("draft", 2, draft_model_dir, num_blocks=2048, max_num_seqs=256)
    outs = engine.generate([prompt] * n, params)
    assert engine.spec.totals.num_drafts >= n
    model = hf_reference(tiny_model_dir)

    def top8(logits: torch.Tensor) -> torch.Tensor:
        kth = logits.topk(8, dim=-1).values[..., -1:]
        return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)

    with torch.no_grad():
        p0 = top8(model(torch.tensor([prompt])).logits[0, -1])
        firsts = p0.nonzero().flatten()
        batch = torch.tensor([[*prompt, int(t)] for t in firsts])
        p1 = top8(model(batch).logits[:, -1])
    marginal = (p0[firsts].unsqueeze(-1) * p1).sum(0)
    counts = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]),
                            minlength=marginal.shape[0])
    assert chi_square_p_value(counts, marginal) > 1e-3


def test_disaggregated_acceptance_equals_colocated(spec_engine, draft_model_dir):
    """1P+1D in one process (KV copied block by block), 16 requests with mixed K: the decode
    engine speculates from its first step (the draft prefills itself there) and accepts
    exactly what the colocated engine accepts, request by request."""
    prompts = repetitive_prompts(16, seed=11)
    params = [greedy(i % 6 if i % 4 else None) for i in range(16)]  # mixed K, 0 included
    for method, k, draft in (("ngram", 4, None), ("draft", 3, draft_model_dir)):
        colocated = spec_engine(method, k, draft)
        expected = {f"r{i}": o for i, o in enumerate(colocated.generate(prompts, params))}
        prefill = spec_engine(method, k, draft, role="prefill", num_blocks=128)
        decode = spec_engine(method, k, draft, role="decode", num_blocks=256)
        assert prefill.spec is None and decode.spec is not None
        dest = {f"r{i}": decode.reserve_remote(f"r{i}", p, params[i])
                for i, p in enumerate(prompts)}
        for i, prompt in enumerate(prompts):
            prefill.add_request(f"r{i}", prompt, params[i])
        hand_over(prefill, decode, dest)
        finals = decode_to_end(decode)
        for rid, out in expected.items():
            assert finals[rid].token_ids == out.token_ids
            assert finals[rid].metrics.spec == out.metrics.spec
        assert decode.spec.totals == colocated.spec.totals
        assert decode.spec.totals.num_accepted_tokens > 0 or method == "draft"
        assert decode.spec.totals.num_drafts >= len(prompts)


def test_draft_with_another_vocabulary_fails_at_start_naming_the_field(spec_engine,
                                                                       tmp_path):
    other = make_tiny_model(tmp_path / "other-vocab")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    with pytest.raises(InvalidParameter) as err:
        spec_engine("draft", 4, other)
    assert err.value.field == "draft_model" and "vocab_size" in str(err.value)


def test_greedy_with_medusa_heads_equals_without_and_transformers(
    spec_engine, medusa_dir, tiny_model_dir, hf_greedy
):
    """The heads read the target's hidden state of each newest token (from the second step
    of a sequence on); random heads are wrong but never change the output."""
    prompts = repetitive_prompts(8, seed=13)
    engine = spec_engine("medusa", 3, medusa_dir, long_prefill_token_threshold=7)
    outs = [o.token_ids for o in engine.generate(prompts, greedy())]
    assert outs == hf_greedy(tiny_model_dir, prompts, NUM_NEW)
    assert engine.spec.totals.num_drafts >= len(prompts)


def test_medusa_heads_that_do_not_fit_fail_at_start_naming_the_field(spec_engine, tmp_path):
    wrong_hidden = make_random_medusa(tmp_path / "wide", hidden=96, vocab=512, num_heads=4)
    with pytest.raises(InvalidParameter) as err:
        spec_engine("medusa", 3, wrong_hidden)
    assert err.value.field == "draft_model" and "hidden_size" in str(err.value)
    few = make_random_medusa(tmp_path / "few", hidden=64, vocab=512, num_heads=2)
    with pytest.raises(InvalidParameter) as err:
        spec_engine("medusa", 3, few)
    assert err.value.field == "num_speculative_tokens"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_verify_steps_replayed_from_cuda_graphs_match_eager_and_transformers(
    method, tiny_model_dir, hf_greedy
):
    """Triton backend on CUDA: verification steps of 1 + K tokens per sequence replay the
    verify graphs (n-gram proposals padded to K) and give transformers' tokens, as eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    prompts = repetitive_prompts(6, seed=17)
    outs = {}
    for eager in (False, True):
        config = EngineConfig(
            model=str(tiny_model_dir), dtype="float32", device="cuda",
            attention_backend="triton", enforce_eager=eager,
            cache=CacheConfig(block_size=16, num_blocks=128),
            scheduler=SchedulerConfig(max_num_seqs=8),
            speculative=SpeculativeConfig(method, 3,
                                          str(tiny_model_dir) if method == "draft" else None),
        )
        engine = LLMEngine(config)
        assert (engine.runner.verify_graph_runner is None) == eager
        assert engine.spec.pad_to_k != eager
        outs[eager] = [o.token_ids for o in engine.generate(prompts, greedy())]
        assert engine.num_free_blocks == engine.num_total_blocks
    assert outs[False] == outs[True] == hf_greedy(tiny_model_dir, prompts, NUM_NEW)


def test_draft_memory_estimate_matches_what_the_draft_allocates(spec_engine, draft_model_dir):
    """The start-up check's estimate (weights + KV of the target pool's block count) is
    within 3% of the draft runner's real parameters and cache (norm weights aside)."""
    from workers.spec.draft_model import draft_bytes

    engine = spec_engine("draft", 2, draft_model_dir, num_blocks=64)
    runner = engine.spec.proposer.runner
    real = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    real += sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
    estimate = draft_bytes(runner.model_config, 64, runner.block_size, runner.dtype.itemsize)
    assert abs(estimate - real) <= 0.03 * real


def test_penalties_and_min_tokens_apply_per_position_inside_a_verification_run(
    spec_engine, tiny_model_dir
):
    """Each verification row sees the drafts before it as output (repetition, presence and
    frequency penalties) and its own min_tokens ban: greedy output equals plain decoding."""
    prompts = repetitive_prompts(6, seed=19)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0, repetition_penalty=1.4,
                            frequency_penalty=0.5, presence_penalty=0.3, min_tokens=6)
    plain = [o.token_ids for o in spec_engine().generate(prompts, params)]
    engine = spec_engine("draft", 4, tiny_model_dir)  # the unpenalized draft guesses wrong
    assert [o.token_ids for o in engine.generate(prompts, params)] == plain
    assert engine.spec.totals.num_accepted_tokens < engine.spec.totals.num_draft_tokens
