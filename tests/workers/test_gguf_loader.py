"""GGUF checkpoints: a tiny checkpoint written as GGUF loads the very same weights and config as
its safetensors folder (every architecture the engine runs; llama's q/k rows un-permuted), its
greedy output equals transformers' loading the same GGUF file, its tokenizer equals the
folder's tokenizer.json, and loading errors name the tensor, the format and what was expected."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.cluster.helpers import hf_greedy
from tests.gguf_files import write_gguf
from workers.attention.torch_backend import TorchAttentionBackend
from workers.config import CacheConfig, EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.errors import (
    InvalidModelConfig,
    InvalidTensor,
    MissingTensor,
    UnsupportedArchitecture,
)
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.tiny_model import CHAT_TEMPLATE, CORPUS
from workers.model.weights import load_checkpoint
from workers.text.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def loaded(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = ModelConfig.from_path(path)
    model = LlamaForCausalLM(config, TorchAttentionBackend())
    load_checkpoint(model, path)
    return config, model.state_dict()


@pytest.mark.parametrize("variant", ["llama", "llama_bias", "mqa", "tied", "linear_rope",
                                     "mistral", "qwen2", "qwen3"])
def test_f32_gguf_loads_the_same_config_and_weights_as_its_folder(variant, make_model_dir,
                                                                  tmp_path):
    folder = make_model_dir(variant)
    path = write_gguf(folder, tmp_path / f"{variant}.gguf")
    config, weights = loaded(path)
    expected_config, expected = loaded(folder)
    # GGUF stores the epsilon as float32; the file name is the model name transformers reports.
    assert config.rms_norm_eps == pytest.approx(expected_config.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(config, rms_norm_eps=expected_config.rms_norm_eps,
                               architecture=expected_config.architecture) == expected_config
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.parametrize(("variant", "qtype"), [("llama", "Q8_0"), ("mqa", "F16"),
                                                ("qwen2", "Q4_1"), ("tied", "Q4_0")])
def test_quantized_gguf_greedy_matches_transformers_on_the_same_file(variant, qtype,
                                                                     make_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_gguf(make_model_dir(variant), tmp_path / "model.gguf", Q[qtype])
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu",
                                    cache=CacheConfig(num_blocks=32)))
    prompts = [[5, 17, 99, 200, 31, 7, 300], [42, 8, 400, 11]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == hf_greedy(reference, prompt, 10)


def test_gguf_tokenizer_equals_the_folder_tokenizer(tiny_model_dir, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "model.gguf")
    ours, expected = Tokenizer(path), Tokenizer(tiny_model_dir)
    texts = CORPUS.splitlines() + ["<|im_start|>user\nHi there<|im_end|>\n", "  two  spaces"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == expected.encode(text)
        assert ours.decode(ids) == expected.decode(ids)
        assert ours.encode(text, add_special_tokens=False) == expected.encode(
            text, add_special_tokens=False)
    assert ours.chat_template == CHAT_TEMPLATE and ours.bos_token_id == expected.bos_token_id
    assert set(ours.eos_token_ids) == set(expected.eos_token_ids)
    chat = [{"role": "user", "content": "Hello"}]
    assert ours.apply_chat_template(chat) == expected.apply_chat_template(chat)


def test_unsupported_block_type_names_tensor_format_and_supported_ones(tiny_model_dir, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "m.gguf",
                      tensor_types={"blk.1.ffn_up.weight": Q.IQ4_NL})
    with pytest.raises(InvalidTensor) as caught:
        loaded(path)
    error = caught.value
    assert (error.name, error.format, error.found) == ("blk.1.ffn_up.weight", "IQ4_NL", "IQ4_NL")
    assert "Q4_K" in error.expected and "Q8_0" in str(error)


def test_missing_tensor_is_named_with_the_file(tiny_model_dir, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "m.gguf", skip=("blk.1.attn_v.weight",))
    with pytest.raises(MissingTensor) as caught:
        loaded(path)
    assert caught.value.name == "blk.1.attn_v.weight" and "m.gguf" in str(caught.value)


def test_wrong_shape_names_tensor_format_and_the_expected_shape(tiny_model_dir, tmp_path):
    # The metadata claims a wider MLP than the tensors have.
    path = write_gguf(tiny_model_dir, tmp_path / "m.gguf", Q.Q8_0,
                      metadata={"llama.feed_forward_length": 96})
    with pytest.raises(InvalidTensor) as caught:
        loaded(path)
    error = caught.value
    assert error.name == "blk.0.ffn_gate.weight" and error.format == "Q8_0"
    assert error.expected == "shape [96, 64] (for model.layers.0.mlp.gate_proj.weight)"
    assert error.found == "shape [128, 64]"


def test_unsupported_architecture_and_tokenizer_are_refused_by_name(tiny_model_dir, tmp_path):
    with pytest.raises(UnsupportedArchitecture, match="GGUF falcon"):
        ModelConfig.from_path(write_gguf(tiny_model_dir, tmp_path / "a.gguf", arch="falcon"))
    sentencepiece = write_gguf(tiny_model_dir, tmp_path / "t.gguf",
                               metadata={"tokenizer.ggml.model": "llama"})
    with pytest.raises(InvalidModelConfig, match="tokenizer.ggml.model"):
        Tokenizer(sentencepiece)
