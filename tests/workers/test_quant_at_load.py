"""`--quantization fp8|int8` on an unquantized checkpoint (workers/model/quant/load_mode.py):
the projections are quantized per output channel while loading, to exactly the weights the
offline `kvrelay quantize --format fp8|int8` writes, so the logits (CPU: the torch reference,
dequantize then matmul) equal the offline checkpoint's bit for bit, from float32 and bfloat16
sources alike; a checkpoint already quantized in another format is refused at start-up
naming `quantization_config`; dummy weights take the same path (the GPU benchmark's)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.attention.torch_backend import TorchAttentionBackend
from workers.bench.quant_quality import prompt_logits
from workers.config import CacheConfig, EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.errors import InvalidModelConfig
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.quant.channel_weight import Fp8Weight, Int8Weight
from workers.model.quant.load_mode import check_load_mode, dummy_scheme
from workers.model.quantize import quantize_checkpoint
from workers.model.weights import load_checkpoint, load_dummy

LAYOUTS = {"fp8": Fp8Weight, "int8": Int8Weight}
IDS = [5, 17, 42, 99, 7, 300, 12, 8, 250, 77, 41, 63, 19, 180]


def bf16_copy(source: Path, out: Path) -> Path:
    """The checkpoint at `source` with every tensor (and torch_dtype) in bfloat16."""
    out.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, out / file.name)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return out


def quantized_buffers(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    return {name: buffer for name, buffer in model.named_buffers() if ".quantized." in name}


def loaded(folder: Path, quantization: str = "auto") -> LlamaForCausalLM:
    model = LlamaForCausalLM(ModelConfig.from_path(folder), TorchAttentionBackend())
    load_checkpoint(model, folder, quantization)
    return model


@pytest.mark.parametrize("method", ["fp8", "int8"])
@pytest.mark.parametrize("source_dtype", ["float32", "bfloat16"])
def test_quantized_at_load_equals_the_offline_quantized_checkpoint(method, source_dtype,
                                                                   tiny_model_dir, tmp_path):
    source = tiny_model_dir if source_dtype == "float32" else bf16_copy(tiny_model_dir,
                                                                        tmp_path / "bf16")
    offline = quantize_checkpoint(str(source), tmp_path / method, method)
    at_load, stored = loaded(source, method), loaded(offline)
    qkv = at_load.layers["1"].self_attn.qkv_proj
    assert qkv.weight is None and isinstance(qkv.quantized, LAYOUTS[method])
    ours, theirs = quantized_buffers(at_load), quantized_buffers(stored)
    # weight + scales of qkv, o, gate_up and down in every layer
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 4 * at_load.config.num_layers
    for name, buffer in ours.items():
        assert buffer.dtype == theirs[name].dtype, name
        assert torch.equal(buffer.view(torch.uint8) if buffer.element_size() == 1 else buffer,
                           theirs[name].view(torch.uint8) if buffer.element_size() == 1
                           else theirs[name]), name
    dense = prompt_logits(str(source), IDS)
    quantized = prompt_logits(str(source), IDS, quantization=method)
    assert torch.equal(quantized, prompt_logits(str(offline), IDS))
    assert not torch.equal(quantized, dense)  # the rounding is really there
    assert (quantized - dense).abs().max() < 0.5


def test_fp8_at_load_generates_the_offline_checkpoints_greedy_tokens(tiny_model_dir, tmp_path):
    offline = quantize_checkpoint(str(tiny_model_dir), tmp_path / "fp8", "fp8")
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [IDS[:5], IDS[3:]]
    outputs = []
    for model, quantization in ((tiny_model_dir, "fp8"), (offline, "auto")):
        engine = LLMEngine(EngineConfig(model=str(model), device="cpu", quantization=quantization,
                                        cache=CacheConfig(num_blocks=32)))
        outputs.append([o.token_ids for o in engine.generate(prompts, params)])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(("stored", "asked"), [("gptq", "fp8"), ("fp8", "int8"), ("int8", "fp8")])
def test_quantizing_an_already_quantized_checkpoint_fails_naming_the_field(
    stored, asked, tiny_model_dir, tmp_path
):
    folder = quantize_checkpoint(str(tiny_model_dir), tmp_path / stored, stored, 32)
    with pytest.raises(InvalidModelConfig, match="quantization_config") as error:
        check_load_mode(folder, asked)
    assert error.value.field == "quantization_config"
    with pytest.raises(InvalidModelConfig, match="quantization_config"):
        loaded(folder, asked)


def test_fp8_on_an_fp8_checkpoint_loads_it_as_stored(tiny_model_dir, tmp_path):
    folder = quantize_checkpoint(str(tiny_model_dir), tmp_path / "fp8", "fp8")
    check_load_mode(folder, "fp8")
    assert isinstance(loaded(folder, "fp8").layers["0"].mlp.down_proj.quantized, Fp8Weight)


def test_serve_refuses_fp8_on_a_gptq_checkpoint_before_ray(tiny_model_dir, tmp_path, capsys):
    from cluster.serve import main

    folder = quantize_checkpoint(str(tiny_model_dir), tmp_path / "gptq", "gptq", 32)
    assert main(["--model", str(folder), "--quantization", "fp8", "--port", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "'quantization_config'" in err[0] and "GPTQ" in err[0], err


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_dummy_weights_with_quantization_at_load_are_kept_quantized(method, tiny_model_dir):
    config = tiny_model_dir / "config.json"
    scheme = dummy_scheme(config, method)
    assert scheme is not None and scheme.method == method
    assert dummy_scheme(config, "auto") is None
    model = LlamaForCausalLM(ModelConfig.from_path(config), TorchAttentionBackend())
    load_dummy(model, seed=1, scheme=scheme)
    assert isinstance(model.layers["0"].self_attn.o_proj.quantized, LAYOUTS[method])


def test_serve_dummy_config_with_quantization_fp8_runs_fp8_weights(tiny_model_dir):
    """`kvrelay serve --dummy-config ... --quantization fp8` (the GPU benchmark's path): the
    runner's random weights are FP8 per channel."""
    from cluster.serve import build_config, parse_args
    from workers.engine.model_runner import ModelRunner

    config = build_config(parse_args(["--dummy-config", str(tiny_model_dir / "config.json"),
                                      "--quantization", "fp8", "--num-blocks", "8"]))
    runner = ModelRunner(dataclasses.replace(config.engine_for("decode"), device="cpu"))
    assert isinstance(runner.model.layers["1"].mlp.gate_up_proj.quantized, Fp8Weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_quantized_at_load_on_the_gpu_equals_the_offline_checkpoint(method, tiny_model_dir,
                                                                    tmp_path):
    """Rounded on the GPU (the at-load path quantizes on the model's device) to the same
    weights as the offline CPU rounding; the FP8 tensor-core / W8A16 kernels then give the
    same logits for both."""
    offline = quantize_checkpoint(str(tiny_model_dir), tmp_path / method, method)
    at_load = prompt_logits(str(tiny_model_dir), IDS, "bfloat16", "cuda", method)
    assert torch.equal(at_load, prompt_logits(str(offline), IDS, "bfloat16", "cuda"))
