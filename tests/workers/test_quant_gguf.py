"""GGUF Q4_0 / Q4_1 projections kept 4-bit (`--quantization gguf`): the W4A16
layout built from the file's blocks dequantizes to exactly the GGUF dequantization (tiny files
written by the gguf package's quantizers, and SmolLM2's Q4_1 file), and greedy generation kept
quantized equals transformers on the same file (tiny model), and SmolLM2 kept quantized gives
the dequantized model's logits."""

from __future__ import annotations

import pytest
import torch

from tests.cluster.helpers import hf_greedy
from tests.gguf_files import write_gguf
from tests.smollm2 import PLAIN_PROMPTS, smollm2_path
from workers.attention.torch_backend import TorchAttentionBackend
from workers.config import CacheConfig, EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.model.config import ModelConfig
from workers.model.gguf_file import GGUFFile
from workers.model.gguf_loader import hf_tensor
from workers.model.llama import LlamaForCausalLM
from workers.model.quant.gguf_q4 import read_gguf_q4
from workers.model.quant.int4_weight import Int4Weight
from workers.model.weights import load_checkpoint
from workers.text.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_kept_quantized_dequantize_to_the_gguf_values(qtype, tiny_model_dir,
                                                                tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "model.gguf",
                      gguf.GGMLQuantizationType[qtype])
    file = GGUFFile(path)
    for layer in range(2):
        for projection in PROJECTIONS:
            name = f"model.layers.{layer}.{projection}.weight"
            weight = read_gguf_q4(file, name)
            assert weight.group_size == 32 and weight.min_form == (qtype == "Q4_1")
            assert torch.equal(weight.dequantize(), hf_tensor(file, name)), name
    head = read_gguf_q4(file, "lm_head.weight")  # output.weight: no rotary reordering
    assert torch.equal(head.dequantize(), hf_tensor(file, "lm_head.weight"))


@pytest.mark.parametrize(("variant", "qtype"), [("llama", "Q4_1"), ("mqa", "Q4_0")])
def test_kept_quantized_gguf_greedy_matches_transformers_on_the_same_file(
    variant, qtype, make_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    path = write_gguf(make_model_dir(variant), tmp_path / "model.gguf",
                      gguf.GGMLQuantizationType[qtype])
    reference_model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", quantization="gguf",
                                    cache=CacheConfig(num_blocks=32)))
    qkv = engine.runner.model.layers["0"].self_attn.qkv_proj
    assert qkv.weight is None and isinstance(qkv.quantized, Int4Weight)
    head = engine.runner.model.lm_head  # output.weight is Q4 too: the logits are W4A16's
    assert head.weight is None and isinstance(head.quantized, Int4Weight)
    prompts = [[5, 17, 99, 200, 31, 7, 300], [42, 8, 400, 11]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for prompt, output in zip(prompts, engine.generate(prompts, params), strict=True):
        assert output.token_ids == hf_greedy(reference_model, prompt, 10)


def test_a_layer_with_one_part_in_another_format_stays_dense(tiny_model_dir, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "model.gguf", gguf.GGMLQuantizationType.Q4_0,
                      tensor_types={"blk.0.attn_v.weight": gguf.GGMLQuantizationType.Q8_0})
    model = LlamaForCausalLM(ModelConfig.from_path(path), TorchAttentionBackend())
    load_checkpoint(model, path, quantization="gguf")
    assert model.layers["0"].self_attn.qkv_proj.quantized is None
    assert isinstance(model.layers["1"].self_attn.qkv_proj.quantized, Int4Weight)
    assert isinstance(model.layers["0"].mlp.gate_up_proj.quantized, Int4Weight)


@pytest.mark.timeout(900)
def test_smollm2_kept_quantized_gives_the_dequantized_models_logits_exactly():
    """On the CPU the kept layout is dequantized per call: with the file's own values that is
    the dequantized-at-load model bit for bit (the GPU runs the W4A16 kernel instead)."""
    from workers.bench.quant_quality import prompt_logits

    path = str(smollm2_path())
    ids = Tokenizer(path).encode(PLAIN_PROMPTS[0])
    model = LlamaForCausalLM(ModelConfig.from_path(path), TorchAttentionBackend())
    load_checkpoint(model, path, quantization="gguf")
    for layer in model.layers.values():
        for linear in (layer.self_attn.qkv_proj, layer.mlp.down_proj):
            assert isinstance(linear.quantized, Int4Weight) and linear.quantized.min_form
    kept = prompt_logits(path, ids, quantization="gguf")
    assert torch.equal(kept, prompt_logits(path, ids))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(900)
def test_smollm2_kept_quantized_on_the_gpu_greedy_equals_dequantized_in_float32():
    """The W4A16 kernel in min form (groups of 32) against cuBLAS on the dequantized weights,
    float32, greedy."""
    path = str(smollm2_path())
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = []
    for keep in ("gguf", "none"):
        engine = LLMEngine(EngineConfig(model=path, device="cuda", dtype="float32",
                                     attention_backend="triton", quantization=keep,
                                     cache=CacheConfig(num_blocks=256)))
        outputs.append([o.token_ids for o in engine.generate(list(PLAIN_PROMPTS), params)])
    assert outputs[0] == outputs[1]
