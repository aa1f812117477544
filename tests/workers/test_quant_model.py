"""Quantized checkpoints served kept quantized: greedy generation of the tiny model loaded from
a GPTQ / AWQ / INT8 / FP8 checkpoint (written by `kvrelay quantize`) equals, token for token,
the same model with those weights dequantized into a plain checkpoint (the right reference for
a quantized model); tensor-parallel ranks hold exactly their shard of the quantized weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.quant_checkpoints import build_model, dequantized_copy
from workers.attention.torch_backend import TorchAttentionBackend
from workers.engine.sampling_params import SamplingParams
from workers.model.config import ModelConfig
from workers.model.linear import ColumnParallelLinear, RowParallelLinear
from workers.model.llama import LlamaForCausalLM
from workers.model.parallel import ParallelContext
from workers.model.quant.channel_weight import Fp8Weight, Int8Weight
from workers.model.quant.int4_weight import Int4Weight
from workers.model.quantize import quantize_checkpoint

CASES = {  # name -> (format, group size, act-order, layout class)
    "gptq": ("gptq", 32, False, Int4Weight),
    "gptq_act_order": ("gptq", 16, True, Int4Weight),
    "gptq_one_group": ("gptq", -1, False, Int4Weight),
    "awq": ("awq", 32, False, Int4Weight),
    "int8": ("int8", 0, False, Int8Weight),
    "fp8": ("fp8", 0, False, Fp8Weight),
}
PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 8, 250, 77, 41, 3 + 60, 19, 180]]


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    out = {}
    for case, (fmt, group, act_order, _) in CASES.items():
        folder = tmp_path_factory.mktemp(case)
        out[case] = quantize_checkpoint(str(tiny_model_dir), folder, fmt, group, act_order)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_projections_load_kept_quantized(case, quantized_dirs):
    model = build_model(quantized_dirs[case])
    layer = model.layers["0"]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert linear.weight is None
        assert isinstance(linear.quantized, CASES[case][3])
    names = {name for name, _ in model.named_parameters()}
    assert not any("proj" in name for name in names), names
    assert model.lm_head.quantized is None and model.lm_head.weight is not None  # no --lm-head
    has_perm = isinstance(layer.mlp.down_proj.quantized, Int4Weight) and any(
        linear.quantized.perm is not None for linear in (layer.self_attn.qkv_proj,
                                                         layer.mlp.gate_up_proj))
    assert has_perm == CASES[case][2]


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_equals_the_dequantized_model(case, quantized_dirs, make_engine,
                                                        tmp_path):
    reference_dir = dequantized_copy(quantized_dirs[case], tmp_path / "dequantized")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    quantized = make_engine(model_dir=quantized_dirs[case]).generate(PROMPTS, params)
    reference = make_engine(model_dir=reference_dir).generate(PROMPTS, params)
    assert [o.token_ids for o in quantized] == [o.token_ids for o in reference]
    assert all(len(o.token_ids) == 12 for o in quantized)


@pytest.mark.parametrize("case", sorted(CASES))
def test_down_projection_takes_the_gate_up_output_where_it_fuses_the_activation(
        case, quantized_dirs):
    """`fuses_activation` is on exactly for 4-bit weights without act-order, and where it is
    on, down_proj(gate_up, gated=True) equals down_proj(silu(gate) * up) bit for bit (here the
    modules' dequantizing path; the kernels' prologue is tests/kernels/test_quant_kernels.py's)."""
    mlp = build_model(quantized_dirs[case]).layers["0"].mlp
    four_bit = isinstance(mlp.down_proj.quantized, Int4Weight)
    assert mlp.down_proj.fuses_activation == (four_bit and not CASES[case][2])
    if not mlp.down_proj.fuses_activation:
        return
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(3, 2 * mlp.down_proj.in_features, generator=generator)
    gate, up = gate_up.chunk(2, dim=-1)
    activated = torch.nn.functional.silu(gate) * up
    assert torch.equal(mlp.down_proj(gate_up, gated=True), mlp.down_proj(activated))


@pytest.mark.parametrize("case", ["gptq", "awq", "int8"])
def test_tensor_parallel_ranks_hold_their_shard_of_the_quantized_weight(case, quantized_dirs):
    full = build_model(quantized_dirs[case]).layers["1"]
    for rank in range(2):
        part = build_model(quantized_dirs[case], ParallelContext(tp_rank=rank, tp_size=2))
        layer = part.layers["1"]
        for name in ("self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj",
                     "mlp.down_proj"):
            whole = full.get_submodule(name)
            shard = layer.get_submodule(name)
            expected = whole.quantized.dequantize()
            if isinstance(whole, RowParallelLinear):
                cols = expected.shape[1] // 2
                expected = expected[:, rank * cols : (rank + 1) * cols]
            else:
                assert isinstance(whole, ColumnParallelLinear)
                pieces = expected.split(whole.output_sizes)
                expected = torch.cat([p.chunk(2)[rank] for p in pieces])
            assert torch.equal(shard.quantized.dequantize(), expected), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["gptq", "gptq_act_order", "awq", "int8"])
def test_greedy_generation_with_the_gpu_kernels_equals_the_dequantized_model(
    case, quantized_dirs, make_engine, tmp_path
):
    """float32 on the GPU: the W4A16 / W8A16 Triton kernels (IEEE float32 dots) against
    cuBLAS on the dequantized weights. (FP8 is left out: its tensor-core path also rounds the
    activations to FP8, so it is not the dequantized model.)"""
    reference_dir = dequantized_copy(quantized_dirs[case], tmp_path / "dequantized")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    quantized = make_engine(model_dir=quantized_dirs[case], device="cuda").generate(PROMPTS, params)
    reference = make_engine(model_dir=reference_dir, device="cuda").generate(PROMPTS, params)
    assert [o.token_ids for o in quantized] == [o.token_ids for o in reference]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["gptq", "awq", "int8", "fp8"])
def test_norms_handed_between_quantized_projections_keep_greedy_output(
    case, quantized_dirs, make_engine, monkeypatch
):
    """With the fused kernels (triton backend, float32, GPU), each layer at decode leaves its
    post-attention norm to o_proj -> gate_up_proj and every layer but the last its successor's
    input norm to down_proj -> qkv_proj (kernels/norm_handoff.py AddNorm); greedy tokens are
    those of the same engine running every norm as a kernel (KVRELAY_FUSED_NORMS=0)."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = make_engine(model_dir=quantized_dirs[case], device="cuda",
                         attention_backend="triton")
    layers = list(engine.runner.model.layers.values())
    residual = torch.zeros(1, device="cuda")
    for rows in (1, 4):
        assert [layer.norm_handoffs(rows, residual) for layer in layers] == (
            [(True, True)] * (len(layers) - 1) + [(True, False)])
    assert layers[0].norm_handoffs(5, residual) == (False, False)  # the tl.dot form's rows
    handed = engine.generate(PROMPTS, params)
    monkeypatch.setenv("KVRELAY_FUSED_NORMS", "0")
    plain_engine = make_engine(model_dir=quantized_dirs[case], device="cuda",
                               attention_backend="triton")
    assert plain_engine.runner.model.layers["0"].norm_handoffs(1, residual) == (False, False)
    plain = plain_engine.generate(PROMPTS, params)
    assert [o.token_ids for o in handed] == [o.token_ids for o in plain]


@pytest.mark.parametrize("case", ["gptq", "awq", "int8", "fp8"])
def test_dummy_weights_of_a_quantized_config_are_the_dense_dummy_weights_quantized(
    case, quantized_dirs
):
    """load_format='dummy' with a quantization_config (benchmarks at real shapes): each
    projection holds the same random weight as the dense dummy model, rounded to its format."""
    from workers.model.quant.scheme import read_scheme
    from workers.model.weights import load_dummy

    folder = quantized_dirs[case]
    config = ModelConfig.from_path(folder)
    dense = LlamaForCausalLM(config, TorchAttentionBackend())
    load_dummy(dense, seed=3, std=0.05)
    quantized = LlamaForCausalLM(config, TorchAttentionBackend())
    load_dummy(quantized, seed=3, std=0.05, scheme=read_scheme(folder))
    for name in ("self_attn.qkv_proj", "mlp.down_proj"):
        expected = dense.layers["1"].get_submodule(name).weight
        layer = quantized.layers["1"].get_submodule(name)
        assert layer.weight is None
        error = (layer.quantized.dequantize() - expected).abs().max().item()
        assert 0 < error < 0.05 * 3.5 / 7, (name, error)  # below one 4-bit step of ~3.5 std
    assert torch.equal(dense.embed_tokens.weight, quantized.embed_tokens.weight)


def test_act_order_weight_cannot_be_split_across_tensor_parallel_input_rows(quantized_dirs):
    """Row-parallel layers split the input rows; with act-order each rank would need the
    other ranks' activations, so loading refuses and names the setting."""
    from workers.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="tp_size.*act-order"):
        build_model(quantized_dirs["gptq_act_order"], ParallelContext(tp_rank=0, tp_size=2))


def test_int8_weights_whose_rows_are_not_whole_words_take_the_dequantized_path():
    """The int8 matrix-vector kernel reads rows as int32 words: K not a multiple of 4 (no
    real model's) multiplies the dequantized weight instead of failing in the kernel."""
    scales = torch.ones(8)
    assert Int8Weight(torch.ones(8, 12, dtype=torch.int8), scales).device_matmul_ok()
    assert not Int8Weight(torch.ones(8, 6, dtype=torch.int8), scales).device_matmul_ok()
