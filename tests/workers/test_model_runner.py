"""ModelRunner: KV cache sizing and layout, attention backend registry, and tensor
parallelism over real torch.distributed (gloo) matching the single-rank logits."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.attention.registry import get_attention_backend
from workers.attention.torch_backend import TorchAttentionBackend
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine.model_runner import CPU_KV_CACHE_BYTES, ModelRunner, resolve_max_model_len
from workers.errors import InvalidParameter
from workers.model.config import ModelConfig
from workers.model.parallel import ParallelContext, layer_range_for_stage

# Tiny model: 2 layers, 2 kv heads, head_dim 16; float32.
TINY_BYTES_PER_BLOCK = 2 * 2 * 16 * 2 * 16 * 4


def runner_for(model_dir, cache: CacheConfig, **kwargs) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(model_dir), device="cpu", cache=cache, **kwargs))


def test_kv_cache_layout_and_bytes_per_block(tiny_model_dir):
    runner = runner_for(tiny_model_dir, CacheConfig(block_size=16, num_blocks=7))
    assert runner.kv_bytes_per_block == TINY_BYTES_PER_BLOCK
    assert runner.num_blocks == 7 and runner.block_size == 16
    assert len(runner.kv_caches) == runner.model_config.num_layers
    for k_cache, v_cache in runner.kv_caches:
        assert k_cache.shape == v_cache.shape == (7, 16, 2, 16)
        assert k_cache.dtype == torch.float32 and k_cache.data_ptr() != v_cache.data_ptr()


def test_cache_sized_from_memory_budget(tiny_model_dir):
    cache = CacheConfig(block_size=16, kv_cache_memory=10 * TINY_BYTES_PER_BLOCK + 5)
    assert runner_for(tiny_model_dir, cache).num_blocks == 10


def test_cpu_default_budget_and_cap_at_what_max_num_seqs_can_use(tiny_model_dir):
    roomy = SchedulerConfig(max_num_seqs=1000)
    runner = runner_for(tiny_model_dir, CacheConfig(block_size=16), scheduler=roomy)
    assert runner.num_blocks == CPU_KV_CACHE_BYTES // TINY_BYTES_PER_BLOCK
    small = SchedulerConfig(max_num_seqs=4)
    capped = runner_for(tiny_model_dir, CacheConfig(), scheduler=small, max_model_len=64)
    assert capped.num_blocks == 4 * (64 // 16)


def test_budget_below_one_block_is_a_typed_error(tiny_model_dir):
    with pytest.raises(InvalidParameter, match="kv_cache_memory"):
        runner_for(tiny_model_dir, CacheConfig(kv_cache_memory=TINY_BYTES_PER_BLOCK - 1))


def test_bfloat16_on_cpu_halves_block_bytes_and_runs(tiny_model_dir, make_step):
    runner = runner_for(tiny_model_dir, CacheConfig(block_size=4, num_blocks=8), dtype="bfloat16")
    assert runner.kv_bytes_per_block == TINY_BYTES_PER_BLOCK // 4 // 2
    assert runner.kv_caches[0][0].dtype == torch.bfloat16
    logits = runner.execute(make_step([([5, 6, 7, 8, 9], 5, [2, 6])], 4))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_logits_follow_logits_indices_order(tiny_model_dir, make_step):
    runner = runner_for(tiny_model_dir, CacheConfig(block_size=4, num_blocks=8))
    step = make_step([([10, 20, 30, 40, 50, 60], 6, [0, 1])], 4, "all")
    everything = runner.execute(step)
    reordered = runner.execute(dataclasses.replace(step, logits_indices=[5, 0, 3]))
    torch.testing.assert_close(reordered, everything[[5, 0, 3]])


def test_max_model_len_is_capped_by_positions_and_sliding_window(tiny_model_dir):
    base = json.loads((tiny_model_dir / "config.json").read_text())
    plain = ModelConfig.from_dict(base)
    assert resolve_max_model_len(None, plain) == 2048
    assert resolve_max_model_len(100, plain) == 100
    with pytest.raises(InvalidParameter, match="4096 exceeds .* 2048"):
        resolve_max_model_len(4096, plain)
    mistral = {**base, "architectures": ["MistralForCausalLM"], "sliding_window": 512}
    assert resolve_max_model_len(None, ModelConfig.from_dict(mistral)) == 512
    qwen_off = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 512}
    assert ModelConfig.from_dict(qwen_off).sliding_window is None


def test_backend_registry_resolves_names_and_rejects_unknown():
    assert isinstance(get_attention_backend("torch"), TorchAttentionBackend)
    with pytest.raises(InvalidParameter, match="attention_backend"):
        get_attention_backend("flashinfer")


def test_layer_ranges_cover_all_layers_once():
    for num_layers, pp_size in ((32, 4), (7, 3), (2, 2)):
        ranges = [layer_range_for_stage(num_layers, r, pp_size) for r in range(pp_size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def _tp_worker(rank: int, model_dir: str, rendezvous: str, step, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        cache = CacheConfig(block_size=4, num_blocks=8)
        config = EngineConfig(model=model_dir, device="cpu", cache=cache)
        runner = ModelRunner(config, ParallelContext(tp_rank=rank, tp_size=2))
        logits = runner.execute(step)
        torch.save(
            {"logits": logits, "kv_shape": tuple(runner.kv_caches[0][0].shape)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_tensor_parallel_2_over_gloo_matches_single_rank(
    variant, make_model_dir, make_step, tmp_path
):
    model_dir = make_model_dir(variant)
    tokens = [3, 99, 250, 17, 8, 300, 41, 77, 120]
    step = make_step([(tokens, 9, [5, 1, 3])], 4, "all")
    single = runner_for(model_dir, CacheConfig(block_size=4, num_blocks=8)).execute(step)
    args = (str(model_dir), str(tmp_path / "rdzv"), step, str(tmp_path))
    mp.spawn(_tp_worker, args=args, nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["kv_shape"] == (8, 4, 1, 16)
        torch.testing.assert_close(result["logits"], single, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llama3_8b_shapes_run_with_dummy_weights_on_gpu(tmp_path, make_step, llama3_8b_config):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**llama3_8b_config, "num_hidden_layers": 2}))
    config = EngineConfig(
        model=str(config_file),
        load_format="dummy",
        device="cuda",
        cache=CacheConfig(block_size=16, num_blocks=64),
    )
    runner = ModelRunner(config)
    assert runner.dtype == torch.bfloat16
    assert runner.kv_caches[0][0].shape == (64, 16, 8, 128)
    tokens = list(range(1000, 1040))
    logits = runner.execute(make_step([(tokens, 40, [5, 9, 1])], 16, "all"))
    assert logits.shape == (40, 128256) and torch.isfinite(logits).all()


def test_kv_heads_split_evenly_or_replicate_where_tp_exceeds_them():
    def heads(num_kv_heads: int, tp_size: int) -> list[range]:
        return [ParallelContext(tp_rank=r, tp_size=tp_size).kv_head_range(num_kv_heads)
                for r in range(tp_size)]

    assert heads(8, 2) == [range(0, 4), range(4, 8)]
    assert heads(2, 4) == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert heads(1, 2) == [range(0, 1), range(0, 1)]  # MQA: every rank holds the head
    with pytest.raises(InvalidParameter, match="2 kv heads cannot be replicated evenly"):
        heads(2, 3)
    with pytest.raises(InvalidParameter, match="not divisible by tp_size 4"):
        heads(6, 4)


def test_tp_size_that_does_not_divide_the_heads_is_a_typed_error(tiny_model_dir):
    with pytest.raises(InvalidParameter, match="not divisible by tp_size 3"):
        ModelRunner(
            EngineConfig(model=str(tiny_model_dir), device="cpu"),
            ParallelContext(tp_rank=0, tp_size=3),
        )
