"""CudaGraphRunner: bucket choice, the scratch block hidden from the pool, and (on CUDA)
decode logits replayed from graphs equal to eager ones, padded batches included."""

from __future__ import annotations

import json

import pytest
import torch

from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine.cuda_graph import batch_buckets
from workers.engine.model_runner import ModelRunner

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_buckets_are_powers_of_two_capped_by_max_num_seqs():
    assert batch_buckets(1) == [1]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


def test_cpu_runner_is_eager_and_its_caches_hide_the_scratch_block(tiny_model_dir):
    runner = ModelRunner(EngineConfig(
        model=str(tiny_model_dir), device="cpu", cache=CacheConfig(block_size=4, num_blocks=6)
    ))
    assert runner.graph_runner is None
    k_cache, v_cache = runner.kv_caches[0]
    assert k_cache.shape[0] == v_cache.shape[0] == 6 and k_cache.is_contiguous()
    assert runner._full_caches[0][0].shape[0] == 7
    assert k_cache.data_ptr() == runner._full_caches[0][0].data_ptr()


def _runner_pair(model: str, dtype: str, backend: str, **kwargs) -> list[ModelRunner]:
    common = dict(
        model=model, dtype=dtype, device="cuda", attention_backend=backend, max_model_len=256,
        cache=CacheConfig(block_size=16, num_blocks=72),
        scheduler=SchedulerConfig(max_num_seqs=8), **kwargs,
    )
    return [ModelRunner(EngineConfig(enforce_eager=eager, **common)) for eager in (False, True)]


def _decode_logits(runners, make_step, vocab: int, num_seqs: int) -> list[torch.Tensor]:
    """Prefill num_seqs prompts eagerly, then one decode step of all of them on each runner."""
    prompts = [[(37 * i + 11 * j) % (vocab - 4) + 4 for j in range(9 + 13 * i)]
               for i in range(num_seqs)]
    tables = [[8 * i + b for b in range(8)] for i in range(num_seqs)]
    prefill = make_step([(p, len(p), t) for p, t in zip(prompts, tables, strict=True)], 16)
    decode = make_step([(p + [5], 1, t) for p, t in zip(prompts, tables, strict=True)], 16)
    logits = []
    for runner in runners:
        runner.execute(prefill)
        logits.append(runner.execute(decode))
    return logits


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("num_seqs", [1, 3, 8])
def test_graph_decode_logits_equal_eager_float32(backend, num_seqs, tiny_model_dir, make_step):
    graphed, eager = _runner_pair(str(tiny_model_dir), "float32", backend)
    assert graphed.graph_runner is not None and eager.graph_runner is None
    assert graphed.graph_runner.bucket_for(num_seqs) >= num_seqs
    vocab = graphed.model_config.vocab_size
    with_graph, without = _decode_logits([graphed, eager], make_step, vocab, num_seqs)
    torch.testing.assert_close(with_graph, without, atol=1e-5, rtol=0)
    # Padding rows wrote only the scratch block: the real blocks hold the same K/V.
    for (k_graph, v_graph), (k_eager, v_eager) in zip(
        graphed.kv_caches, eager.kv_caches, strict=True
    ):
        torch.testing.assert_close(k_graph, k_eager, atol=1e-5, rtol=0)
        torch.testing.assert_close(v_graph, v_eager, atol=1e-5, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_llama3_8b_shapes_graph_decode_close_to_eager_bf16(tmp_path, make_step, llama3_8b_config):
    """Real Llama-3-8B layer shapes (2 layers, dummy weights, bf16, fused ops): graph replay
    and eager agree to bf16 rounding (batch shapes differ: 5 rows padded to 8)."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**llama3_8b_config, "num_hidden_layers": 2}))
    runners = _runner_pair(str(config_file), "bfloat16", "triton", load_format="dummy")
    assert all(r.model.ops.fused for r in runners)
    with_graph, without = _decode_logits(runners, make_step, 128256, 5)
    assert torch.isfinite(with_graph).all()
    assert (with_graph - without).abs().max() <= 0.02 * without.abs().max()
