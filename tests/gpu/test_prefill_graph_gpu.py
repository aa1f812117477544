"""Prefill steps replayed from CUDA graphs (workers/engine/prefill_graph.py) on the GPU:
greedy tokens equal to enforce_eager for prompts of 9..600 tokens with prefix caching on,
Llama-3-8B shapes close to eager in bf16, and the prefix-cache bench's cached TTFT served by
the graphs. The padding logic itself is checked on CPU in tests/workers/test_prefill_graph.py.

Self-contained (no fixtures from tests/conftest.py), so it runs with
`pytest -m gpu --confcutdir=tests/gpu tests/gpu/test_prefill_graph_gpu.py`.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LENGTHS = [9, 12, 16, 17, 40, 64, 100, 129, 200, 256, 257, 300, 511, 512, 513, 600]


@functools.lru_cache(maxsize=1)
def _tiny_model_dir() -> str:
    import tempfile

    from workers.model.tiny_model import make_variant

    return str(make_variant(tempfile.mkdtemp(prefix="kvrelay-gpu-"), "llama"))


def _count_prefill_graph_runs(runner) -> list[int]:
    """Each step's token count the runner's prefill graphs serve (calls through to `run`)."""
    counted: list[int] = []
    graphs = runner.prefill_graph_runner
    run = graphs.run

    def counting_run(step):
        counted.append(step.num_tokens)
        return run(step)

    graphs.run = counting_run
    return counted


def _prompts(vocab_size: int) -> list[list[int]]:
    """Every length twice: once alone, once behind a 64-token prefix seen before (4 cached
    blocks, so the step prefills length tokens after a cached context); prompts over 512
    tokens are chunked (max_num_batched_tokens 512), their last chunk graphed."""
    rng = random.Random(3)
    shared = [rng.randrange(4, vocab_size) for _ in range(64)]
    prompts = [shared + [5]]
    for n in LENGTHS:
        prompts.append([rng.randrange(4, vocab_size) for _ in range(n)])
        prompts.append(shared + [rng.randrange(4, vocab_size) for _ in range(n)])
    return prompts


def _engine_tokens(enforce_eager: bool) -> tuple[list[list[int]], list[int]]:
    from workers.config import CacheConfig, EngineConfig, SchedulerConfig
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams

    config = EngineConfig(
        model=_tiny_model_dir(), dtype="float32", device="cuda", attention_backend="triton",
        max_model_len=1024, enforce_eager=enforce_eager,
        cache=CacheConfig(block_size=16, num_blocks=512, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
    )
    engine = LLMEngine(config)
    assert (engine.runner.prefill_graph_runner is None) == enforce_eager
    counted = [] if enforce_eager else _count_prefill_graph_runs(engine.runner)
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=0)
    tokens = []
    for prompt in _prompts(engine.model_config.vocab_size):  # one at a time: 1-sequence steps
        tokens.append(engine.generate([prompt], params)[0].token_ids)
    assert engine.num_free_blocks == engine.num_total_blocks
    return tokens, counted


def test_greedy_with_prefill_graphs_equals_eager_with_prefix_caching():
    graphed, counted = _engine_tokens(enforce_eager=False)
    eager, _ = _engine_tokens(enforce_eager=True)
    assert graphed == eager
    # Every prompt of 9..512 new tokens was prefilled by a graph, with and without a cached
    # prefix; the 600-token prompt's last chunk (600 - 512 = 88) too.
    for n in [n for n in LENGTHS if n <= 512] + [88]:
        assert n in counted, (n, sorted(set(counted)))
    assert max(counted) <= 512 and min(counted) > 8


def test_llama3_8b_shapes_graphed_prefill_close_to_eager_bf16(tmp_path):
    """Real Llama-3-8B layer shapes (2 layers, dummy weights, bf16, fused ops): a 200-token
    step after a 600-token context, graph replay (bucket 256) against eager."""
    from workers.config import CacheConfig, EngineConfig
    from workers.engine.model_runner import ModelRunner
    from workers.engine.step_input import StepInput
    from workers.model.presets import load_preset

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**load_preset("llama3-8b"), "num_hidden_layers": 2}))
    runners = [ModelRunner(EngineConfig(
        model=str(config_file), load_format="dummy", dtype="bfloat16", device="cuda",
        attention_backend="triton", max_model_len=1024, enforce_eager=eager,
        cache=CacheConfig(block_size=16, num_blocks=64))) for eager in (False, True)]
    assert runners[0].prefill_graph_runner is not None
    assert runners[1].prefill_graph_runner is None
    prompt = [(37 * i) % 120000 + 100 for i in range(800)]
    table = list(range(50))

    def step(start: int, stop: int) -> StepInput:
        return StepInput(
            seq_ids=["0"], token_ids=prompt[start:stop], positions=list(range(start, stop)),
            slot_mapping=[table[p // 16] * 16 + p % 16 for p in range(start, stop)],
            query_start_loc=[0, stop - start], seq_lens=[stop], block_tables=[table],
            logits_indices=[stop - start - 1])

    assert runners[0].prefill_graph_runner.can_run(step(600, 800))
    graphed, eager = [[r.execute(step(0, 600)), r.execute(step(600, 800))][1] for r in runners]
    assert torch.isfinite(graphed).all()
    assert (graphed - eager).abs().max() <= 0.02 * eager.abs().max()


def test_prefix_cache_bench_ttft_step_is_graphed():
    """bench_prefix_cache's engine (its own config) serves a cached request's uncached tail
    from a prefill graph: the TTFT it reports is the graphed one."""
    bench = pytest.importorskip("cluster.bench.bench_prefix_cache")
    from workers.engine.engine import LLMEngine

    args = bench.parse_args([
        "--dummy-config", str(Path(_tiny_model_dir()) / "config.json"), "--device", "cuda",
        "--attention-backend", "triton", "--shared-len", "256", "--unique-len", "40",
        "--num-requests", "2", "--output-len", "2"])
    engine = LLMEngine(bench.engine_config(args, caching=True))
    counted = _count_prefill_graph_runs(engine.runner)
    (seed_prompt,), prompts = bench.workload(args, engine.model_config.vocab_size)
    engine.generate([seed_prompt], bench.params(args))
    engine.generate([prompts[0]], bench.params(args))
    assert counted[-1] == args.unique_len

