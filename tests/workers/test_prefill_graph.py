"""PrefillGraphRunner (and the GraphRunner padding it shares with the decode runner), run on
CPU without capture (`capture=False`: the same padded forward the graphs replay, eagerly):
one sequence's step padded to a token bucket as two rows gives the eager step's logits, with
and without earlier context, and writes no KV slot outside the sequence's blocks and the
scratch block. The GPU tests (engine with graphs == enforce_eager, and the prefix-cache
bench using them) are in tests/gpu/test_prefill_graph_gpu.py."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from workers.config import CacheConfig, EngineConfig
from workers.engine.cuda_graph import CudaGraphRunner
from workers.engine.model_runner import ModelRunner
from workers.engine.prefill_graph import PrefillGraphRunner, build_prefill_graph_runner
from workers.engine.step_input import StepInput

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU: TRITON_INTERPRET=1")

BLOCK = 4
NUM_BLOCKS = 48
MAX_MODEL_LEN = 192
BUCKETS = (8, 16, 32, 64, 256)  # 8: decode-shaped, 256: over max_model_len, both dropped


def _runner(model_dir, backend: str = "triton") -> ModelRunner:
    runner = ModelRunner(EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", attention_backend=backend,
        max_model_len=MAX_MODEL_LEN, cache=CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
    ))
    # The same noise in every slot of both runners (scratch block included): a stray write
    # shows as a changed value.
    generator = torch.Generator().manual_seed(7)
    for k_cache, v_cache in runner._full_caches:
        k_cache.copy_(torch.randn(k_cache.shape, generator=generator))
        v_cache.copy_(torch.randn(v_cache.shape, generator=generator))
    return runner


def _padded(runner: ModelRunner) -> PrefillGraphRunner:
    return PrefillGraphRunner(runner.model, runner._full_caches, BUCKETS, runner.max_model_len,
                              scratch_block=runner.num_blocks, capture=False)


def _chunk(prompt: list[int], table: list[int], start: int, stop: int) -> StepInput:
    """Tokens start..stop-1 of one sequence; logits of its last token only if the prompt
    ends there (as the scheduler builds a chunk)."""
    return StepInput(
        seq_ids=["0"], token_ids=prompt[start:stop], positions=list(range(start, stop)),
        slot_mapping=[table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, stop)],
        query_start_loc=[0, stop - start], seq_lens=[stop], block_tables=[list(table)],
        logits_indices=[stop - start - 1] if stop == len(prompt) else [],
    )


def _scratch(runner: ModelRunner) -> list[torch.Tensor]:
    return [cache[runner.num_blocks] for layer in runner._full_caches for cache in layer]


def _prefill_both(model_dir, prompt: list[int], bounds: list[int]):
    """Runs the chunks bounds[i]..bounds[i+1] on an eager runner and on one whose single-
    sequence steps go through the padded PrefillGraphRunner; returns both runners, the
    table, and each runner's logits of the last chunk."""
    eager, padded = _runner(model_dir), _runner(model_dir)
    padded.prefill_graph_runner = _padded(padded)
    # Blocks out of order (5 is prime to NUM_BLOCKS): a write through a wrong table shows.
    table = [(5 * i + 3) % NUM_BLOCKS for i in range(-(-len(prompt) // BLOCK))]
    for start, stop in zip(bounds, bounds[1:], strict=False):
        step = _chunk(prompt, table, start, stop)
        assert padded.prefill_graph_runner.can_run(step) == (8 < stop - start <= 64)
        logits = [eager.execute(step), padded.execute(step)]
    return eager, padded, table, logits


def _assert_same_prefill(eager: ModelRunner, padded: ModelRunner, table: list[int], logits):
    eager_logits, padded_logits = logits
    torch.testing.assert_close(padded_logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(padded_logits.argmax(-1), eager_logits.argmax(-1))
    own = torch.tensor(table)
    others = torch.tensor(sorted(set(range(NUM_BLOCKS)) - set(table)))
    for (k_eager, v_eager), (k_padded, v_padded) in zip(
            eager.kv_caches, padded.kv_caches, strict=True):
        for mine, theirs in ((k_padded, k_eager), (v_padded, v_eager)):
            torch.testing.assert_close(mine[own], theirs[own], atol=1e-5, rtol=1e-5)
            assert torch.equal(mine[others], theirs[others]), "a block it does not own changed"


@needs_triton
@pytest.mark.parametrize("length", [9, 16, 17, 40, 64])
def test_padded_prefill_equals_eager_in_every_bucket(tiny_model_dir, length):
    """A whole prompt of 9..64 tokens in bucket 16, 32 or 64: row 1 pads with 0..24 tokens."""
    prompt = [(11 * i + 5) % 200 + 4 for i in range(length)]
    eager, padded, table, logits = _prefill_both(tiny_model_dir, prompt, [0, length])
    _assert_same_prefill(eager, padded, table, logits)
    bucket = padded.prefill_graph_runner.bucket_for_step(_chunk(prompt, table, 0, length))
    changed = any(not torch.equal(a, b) for a, b in zip(
        _scratch(padded), _scratch(eager), strict=True))
    assert changed == (bucket > length), "padding tokens write the scratch block, only it"


@needs_triton
@pytest.mark.parametrize(("prefix", "new"), [(68, 9), (68, 30), (70, 17), (100, 64)])
def test_padded_prefill_after_a_cached_prefix_equals_eager(tiny_model_dir, prefix, new):
    """The prefix (> 64 tokens: an eager step on both runners) stands for cached blocks; the
    new tokens start block-aligned (a prefix-cache hit) or mid-block (a chunk boundary)."""
    prompt = [(7 * i + 3) % 200 + 4 for i in range(prefix + new)]
    eager, padded, table, logits = _prefill_both(tiny_model_dir, prompt, [0, prefix, prefix + new])
    _assert_same_prefill(eager, padded, table, logits)


@needs_triton
def test_chunks_of_a_long_prompt_through_the_padded_runner_equal_eager(tiny_model_dir):
    """150 tokens in chunks of 50 (bucket 64, contexts 0, 50, 100; the first two chunks
    return no logits) and a last chunk of 10 (bucket 16)."""
    prompt = [(13 * i + 1) % 200 + 4 for i in range(160)]
    eager, padded, table, logits = _prefill_both(tiny_model_dir, prompt, [0, 50, 100, 150, 160])
    _assert_same_prefill(eager, padded, table, logits)


def test_steps_the_prefill_runner_takes_and_their_buckets(tiny_model_dir):
    runner = _runner(tiny_model_dir, backend="torch")
    padded = _padded(runner)
    assert padded.buckets == [16, 32, 64]
    prompt, table = list(range(4, 104)), list(range(25))

    def step(start: int, stop: int) -> StepInput:
        return _chunk(prompt, table, start, stop)

    assert not padded.can_run(step(0, 8)) and padded.can_run(step(0, 9))
    assert padded.can_run(step(30, 94)) and not padded.can_run(step(30, 95))
    assert [padded.bucket_for_step(step(0, n)) for n in (9, 16, 17, 33, 64)] == [16, 16, 32,
                                                                                 64, 64]
    two = dataclasses.replace(step(0, 20), seq_ids=["0", "1"], query_start_loc=[0, 10, 20],
                              seq_lens=[10, 10], block_tables=[table, table])
    assert not padded.can_run(two)
    assert not padded.can_run(dataclasses.replace(step(0, 20), tree_masks=[0] * 20))


def test_prefill_graphs_only_for_triton_where_decode_is_graphed(tiny_model_dir):
    """The torch reference slices rows by host lengths: no prefill graphs for it."""
    runner = _runner(tiny_model_dir, backend="torch")
    args = (runner.model, runner._full_caches, runner.max_model_len, runner.num_blocks)
    triton = dataclasses.replace(runner.config, attention_backend="triton")
    assert build_prefill_graph_runner(runner.config, *args, decode_graphs=True) is None
    assert build_prefill_graph_runner(triton, *args, decode_graphs=False) is None
    none = dataclasses.replace(triton, cuda_graph_prefill_tokens=(4, 8, MAX_MODEL_LEN + 1))
    assert build_prefill_graph_runner(none, *args, decode_graphs=True) is None
    assert runner.prefill_graph_runner is None  # CPU: never graphs


@pytest.mark.parametrize(("backend", "query_len"), [
    ("torch", 1), pytest.param("triton", 1, marks=needs_triton),
    pytest.param("triton", 3, marks=needs_triton)])
def test_padded_decode_equals_eager(tiny_model_dir, make_step, backend, query_len):
    """The decode (and verification) runner's padding, shared with the prefill runner:
    3 sequences in bucket 4, the fourth row a fake sequence in the scratch block."""
    eager, padded = _runner(tiny_model_dir, backend), _runner(tiny_model_dir, backend)
    prompts = [[(5 * i + 7 * j) % 200 + 4 for j in range(6 + 5 * i)] for i in range(3)]
    tables = [[3 * i + b for b in range(6)] for i in range(3)]
    prefill = make_step([(p, len(p), t) for p, t in zip(prompts, tables, strict=True)], BLOCK)
    more = [p + [9, 10, 11][:query_len] for p in prompts]
    decode = make_step([(p, query_len, t) for p, t in zip(more, tables, strict=True)], BLOCK,
                       logits="all")
    graphs = CudaGraphRunner(padded.model, padded._full_caches, max_num_seqs=8,
                             max_model_len=MAX_MODEL_LEN, scratch_block=padded.num_blocks,
                             query_len=query_len, capture=False)
    assert graphs.can_run(decode) and graphs.bucket_for_step(decode) == 4
    logits = []
    for runner in (eager, padded):
        runner.execute(prefill)
        runner.graph_runner = graphs if runner is padded else None
        logits.append(runner.execute(decode))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    _assert_same_prefill(eager, padded, sum(tables, []), logits)


@needs_triton
def test_a_kv_stream_hook_keeps_prefill_eager(tiny_model_dir):
    """With a `layer_done` hook (a per-layer KV stream) the step runs eagerly: the hook sees
    every layer and the padding row never runs (the scratch block keeps its noise)."""
    runner = _runner(tiny_model_dir)
    runner.prefill_graph_runner = _padded(runner)
    before = [t.clone() for t in _scratch(runner)]
    prompt = list(range(4, 24))
    step = _chunk(prompt, list(range(5)), 0, 20)
    assert runner.prefill_graph_runner.can_run(step)
    done: list[int] = []
    runner.execute(step, layer_done=done.append)
    assert done == list(range(runner.num_local_layers))
    assert all(torch.equal(a, b) for a, b in zip(_scratch(runner), before, strict=True))
    runner.execute(step)  # the same step without the hook: padded, the scratch block written
    assert not all(torch.equal(a, b) for a, b in zip(_scratch(runner), before, strict=True))
