"""The Llama-family model against Hugging Face transformers (float32, CPU), per variant:
full prompts, chunked prefill through a shuffled paged cache, decode steps, batch mixes."""

from __future__ import annotations

import os
import random

import pytest
import torch

from workers.attention.torch_backend import TorchAttentionBackend
from workers.config import CacheConfig, EngineConfig
from workers.engine.model_runner import ModelRunner
from workers.errors import InvalidModelConfig, UnsupportedArchitecture
from workers.model.config import ModelConfig
from workers.model.llama import IntermediateTensors, LlamaForCausalLM
from workers.model.parallel import ParallelContext
from workers.model.tiny_model import VARIANTS

BLOCK_SIZE = 4
NUM_BLOCKS = 24
ATOL = 1e-4


TRITON_RUNS = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def make_runner(model_dir, backend: str = "torch", device: str = "cpu", **kwargs) -> ModelRunner:
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    config = EngineConfig(
        model=str(model_dir),
        device=device,
        dtype="float32",
        attention_backend=backend,
        cache=cache,
    )
    return ModelRunner(config, **kwargs)


def random_prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, vocab) for _ in range(length)]


def hf_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_prompt_logits_match_transformers(variant, make_model_dir, hf_reference, make_step):
    folder = make_model_dir(variant)
    runner = make_runner(folder)
    prompt = random_prompt(13, runner.model_config.vocab_size)
    table = list(range(4))
    logits = runner.execute(make_step([(prompt, len(prompt), table)], BLOCK_SIZE, "all"))
    assert logits.dtype == torch.float32
    assert logits.shape == (len(prompt), runner.model_config.vocab_size)
    torch.testing.assert_close(logits, hf_logits(hf_reference(folder), prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chunked_prefill_with_shuffled_blocks_matches_transformers(
    variant, make_model_dir, hf_reference, make_step
):
    folder = make_model_dir(variant)
    runner = make_runner(folder)
    prompt = random_prompt(23, runner.model_config.vocab_size, seed=1)
    table = random.Random(2).sample(range(NUM_BLOCKS), 6)
    chunks = []
    for end in range(5, len(prompt) + 5, 5):
        tokens = prompt[: min(end, len(prompt))]
        num_new = len(tokens) - len(prompt[: end - 5])
        chunks.append(runner.execute(make_step([(tokens, num_new, table)], BLOCK_SIZE, "all")))
    expected = hf_logits(hf_reference(folder), prompt)
    torch.testing.assert_close(torch.cat(chunks), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_decode_steps_match_transformers(variant, make_model_dir, hf_reference, make_step):
    folder = make_model_dir(variant)
    runner, reference = make_runner(folder), hf_reference(folder)
    tokens = random_prompt(9, runner.model_config.vocab_size, seed=3)
    table = [7, 3, 11, 5]
    logits = runner.execute(make_step([(tokens, len(tokens), table)], BLOCK_SIZE))
    for _ in range(4):
        torch.testing.assert_close(logits[0], hf_logits(reference, tokens)[-1], atol=ATOL, rtol=0)
        tokens = tokens + [int(logits[0].argmax())]
        logits = runner.execute(make_step([(tokens, 1, table)], BLOCK_SIZE))


@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_triton_backend_matches_transformers_chunked_and_decode(
    variant, make_model_dir, hf_reference, make_step
):
    folder = make_model_dir(variant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = make_runner(folder, backend="triton", device=device)
    prompt = random_prompt(14, runner.model_config.vocab_size, seed=8)
    table = [6, 2, 9, 0]
    first = runner.execute(make_step([(prompt[:9], 9, table)], BLOCK_SIZE, "all"))
    rest = runner.execute(make_step([(prompt, 5, table)], BLOCK_SIZE, "all"))
    decode = runner.execute(make_step([(prompt + [42], 1, table)], BLOCK_SIZE))
    logits = torch.cat([first, rest, decode]).cpu()
    reference = hf_reference(folder)
    expected = torch.cat([hf_logits(reference, prompt), hf_logits(reference, prompt + [42])[-1:]])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", ["llama3_rope", "qwen3"])
def test_fused_ops_match_transformers_prefill_and_decode(
    variant, make_model_dir, hf_reference, make_step
):
    """The Triton norm/rope/activation path: the runner picks it on CUDA with the triton
    backend; on CPU it is built here directly, so CI runs it in the interpreter."""
    folder = make_model_dir(variant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = make_runner(folder, backend="triton", device=device)
    assert runner.model.ops.fused == (device == "cuda")
    if device == "cpu":
        with torch.device(device):
            fused = LlamaForCausalLM(
                runner.model_config, runner.model.layers["0"].self_attn.backend,
                fused_ops=True, max_positions=runner.max_model_len,
            )
        fused.load_state_dict(runner.model.state_dict())
        runner.model = fused.eval()
    assert runner.model.ops.fused
    prompt = random_prompt(11, runner.model_config.vocab_size, seed=9)
    table = [3, 8, 1, 5]
    first = runner.execute(make_step([(prompt, len(prompt), table)], BLOCK_SIZE, "all"))
    decode = runner.execute(make_step([(prompt + [42], 1, table)], BLOCK_SIZE))
    reference = hf_reference(folder)
    expected = torch.cat([hf_logits(reference, prompt), hf_logits(reference, prompt + [42])[-1:]])
    torch.testing.assert_close(torch.cat([first, decode]).cpu(), expected, atol=ATOL, rtol=0)


def test_mixed_batch_of_prefill_chunk_decode_and_verification(
    tiny_model_dir, hf_reference, make_step
):
    """One step packing a decode token, a prefill chunk and a 3-token verification run."""
    runner, reference = make_runner(tiny_model_dir), hf_reference(tiny_model_dir)
    vocab = runner.model_config.vocab_size
    a, b, c = (random_prompt(n, vocab, seed) for n, seed in ((10, 4), (14, 5), (7, 6)))
    tables = [[0, 1, 2], [3, 4, 5, 6], [9, 8]]
    runner.execute(make_step([(a[:9], 9, tables[0]), (c[:4], 4, tables[2])], BLOCK_SIZE))
    step = make_step([(a, 1, tables[0]), (b, 14, tables[1]), (c, 3, tables[2])], BLOCK_SIZE, "all")
    logits = runner.execute(step)
    expected = torch.cat(
        [hf_logits(reference, a)[-1:], hf_logits(reference, b), hf_logits(reference, c)[-3:]]
    )
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_two_pipeline_stages_chain_to_the_full_model(tiny_model_dir, hf_reference, make_step):
    stages = [
        make_runner(tiny_model_dir, parallel=ParallelContext(pp_rank=rank, pp_size=2))
        for rank in range(2)
    ]
    assert [s.layer_range for s in stages] == [(0, 1), (1, 2)]
    assert len(stages[0].kv_caches) == len(stages[1].kv_caches) == 1
    prompt = random_prompt(11, stages[0].model_config.vocab_size, seed=7)
    step = make_step([(prompt, len(prompt), [2, 0, 1])], BLOCK_SIZE, "all")
    hidden = stages[0].forward_stage(step)
    assert isinstance(hidden, IntermediateTensors)
    logits = stages[1].forward_stage(step, hidden)
    expected = hf_logits(hf_reference(tiny_model_dir), prompt)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_llama3_8b_config_builds_real_shapes_on_meta_device(llama3_8b_config):
    cfg = ModelConfig.from_dict(llama3_8b_config)
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.eos_token_ids) == (128, 8, (128001, 128008, 128009))
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, TorchAttentionBackend())
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    slots = model.checkpoint_map()
    assert len(slots) == 2 + 1 + 32 * 9
    assert slots["model.layers.31.self_attn.k_proj.weight"].full_shape == (1024, 4096)
    assert slots["model.layers.0.mlp.up_proj.weight"].full_shape == (14336, 4096)
    assert slots["lm_head.weight"].full_shape == (128256, 4096)


def test_tensor_parallel_layers_hold_their_shard_on_meta_device(llama3_8b_config):
    cfg = ModelConfig.from_dict(llama3_8b_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, TorchAttentionBackend(), ParallelContext(1, 4), (30, 32))
    attn = model.layers["31"].self_attn
    assert attn.qkv_proj.weight.shape == ((4096 + 2 * 1024) // 4, 4096)
    assert attn.o_proj.weight.shape == (4096, 1024)
    assert model.lm_head.weight.shape == (128256 // 4, 4096)
    assert not model.has_embedding and "model.layers.29.input_layernorm.weight" not in (
        model.checkpoint_map()
    )


def test_unsupported_architecture_names_it_and_the_supported_ones(llama3_8b_config):
    with pytest.raises(UnsupportedArchitecture) as error:
        ModelConfig.from_dict({**llama3_8b_config, "architectures": ["GPT2LMHeadModel"]})
    assert error.value.name == "GPT2LMHeadModel"
    assert "Qwen3ForCausalLM" in error.value.supported and "GPT2LMHeadModel" in str(error.value)


def test_config_reads_transformers5_rope_and_rejects_unsupported_features(
    llama3_8b_config,
):
    raw = {k: v for k, v in llama3_8b_config.items() if k not in ("rope_theta", "rope_scaling")}
    raw["rope_parameters"] = {**llama3_8b_config["rope_scaling"], "rope_theta": 500000.0}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.original_max_position_embeddings == 8192
    with pytest.raises(InvalidModelConfig, match="gelu"):
        ModelConfig.from_dict({**llama3_8b_config, "hidden_act": "gelu"})
    with pytest.raises(InvalidModelConfig, match="yarn"):
        ModelConfig.from_dict(
            {**llama3_8b_config, "rope_scaling": {"rope_type": "yarn", "factor": 4}}
        )


def test_torch_backend_batched_decode_equals_per_sequence_attention():
    """The batched decode path (padded, masked) against causal_attention per sequence."""
    from workers.attention.torch_backend import (
        batched_decode_attention,
        causal_attention,
        gather_kv,
    )

    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 12, 4, 2, 8, generator=gen)
    seq_lens = torch.tensor([1, 9, 4], dtype=torch.int32)
    tables = torch.tensor([[5, 0, 0], [2, 7, 11], [3, 1, 0]], dtype=torch.int32)
    q = torch.randn(3, 6, 8, generator=gen)
    batched = batched_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.3)
    for i, length in enumerate(seq_lens.tolist()):
        keys, values = (gather_kv(c, tables[i], length) for c in (k_cache, v_cache))
        expected = causal_attention(q[i : i + 1], keys, values, 0.3)[0]
        torch.testing.assert_close(batched[i], expected)


def test_torch_backend_batched_decode_ignores_nan_in_unowned_cache_slots():
    """Slots past each sequence's length (and blocks it does not own) hold NaN/Inf: the
    batched decode path must equal the per-sequence path and stay finite."""
    from workers.attention.torch_backend import (
        batched_decode_attention,
        causal_attention,
        gather_kv,
    )

    gen = torch.Generator().manual_seed(1)
    block_size = 4
    k_cache, v_cache = torch.full((2, 12, block_size, 2, 8), float("nan"))
    seq_lens = torch.tensor([1, 9, 6], dtype=torch.int32)
    tables = torch.tensor([[5, 0, 0], [2, 7, 11], [3, 1, 0]], dtype=torch.int32)
    for table, length in zip(tables.tolist(), seq_lens.tolist(), strict=True):
        for pos in range(length):
            block, offset = table[pos // block_size], pos % block_size
            for cache in (k_cache, v_cache):
                cache[block, offset] = torch.randn(2, 8, generator=gen)
    k_cache[0, 0, 0, 0], v_cache[4, 1, 1, 3] = float("inf"), float("-inf")
    q = torch.randn(3, 6, 8, generator=gen)
    for max_len in (None, 12):
        batched = batched_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.3, max_len)
        assert torch.isfinite(batched).all()
        for i, length in enumerate(seq_lens.tolist()):
            keys, values = (gather_kv(c, tables[i], length) for c in (k_cache, v_cache))
            expected = causal_attention(q[i : i + 1], keys, values, 0.3)[0]
            torch.testing.assert_close(batched[i], expected)
