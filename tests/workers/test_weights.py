"""Checkpoint loading: single and sharded safetensors, typed errors naming the tensor, and
deterministic dummy weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.attention.torch_backend import TorchAttentionBackend
from workers.config import CacheConfig, EngineConfig
from workers.engine.model_runner import ModelRunner
from workers.errors import CheckpointFileMissing, MissingTensor, TensorShapeMismatch
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.weights import INDEX_FILE, load_checkpoint, load_dummy


def new_model(folder) -> LlamaForCausalLM:
    return LlamaForCausalLM(ModelConfig.from_path(folder), TorchAttentionBackend())


def copy_without_weights(source, target):
    target.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    return target


def test_loaded_parameters_equal_checkpoint_tensors(tiny_model_dir):
    model = new_model(tiny_model_dir)
    load_checkpoint(model, tiny_model_dir)
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    qkv = model.layers["1"].self_attn.qkv_proj.weight
    expected = torch.cat([tensors[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(qkv, expected)
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])


def test_sharded_checkpoint_with_index_loads_the_same_weights(tiny_model_dir, tmp_path):
    sharded = copy_without_weights(tiny_model_dir, tmp_path / "sharded")
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / file))
        weight_map.update(dict.fromkeys(part, file))
    (sharded / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    whole, split = new_model(tiny_model_dir), new_model(sharded)
    load_checkpoint(whole, tiny_model_dir)
    load_checkpoint(split, sharded)
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_folder_without_weights_is_a_missing_file(tiny_model_dir, tmp_path):
    empty = copy_without_weights(tiny_model_dir, tmp_path / "empty")
    with pytest.raises(CheckpointFileMissing, match="no \\*.safetensors"):
        load_checkpoint(new_model(empty), empty)


def test_index_naming_an_absent_shard_names_the_file(tiny_model_dir, tmp_path):
    folder = copy_without_weights(tiny_model_dir, tmp_path / "bad-index")
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors"}
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointFileMissing) as error:
        load_checkpoint(new_model(folder), folder)
    assert error.value.path.endswith("model-00001-of-00002.safetensors")


def rewrite_checkpoint(source, target, edit) -> None:
    copy_without_weights(source, target)
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_checkpoint(tiny_model_dir, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(MissingTensor) as error:
        load_checkpoint(new_model(tmp_path / "m"), tmp_path / "m")
    assert error.value.name == name and name in str(error.value)


def test_wrong_shape_names_the_tensor_and_both_shapes(tiny_model_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def truncate(tensors):
        tensors[name] = tensors[name][:16].contiguous()

    rewrite_checkpoint(tiny_model_dir, tmp_path / "s", truncate)
    with pytest.raises(TensorShapeMismatch) as error:
        load_checkpoint(new_model(tmp_path / "s"), tmp_path / "s")
    found = error.value
    assert (found.name, found.expected, found.actual) == (name, (32, 64), (16, 64))
    assert "[16, 64]" in str(error.value) and "[32, 64]" in str(error.value)


def test_dummy_weights_are_deterministic_by_seed_and_cover_every_parameter(tiny_model_dir):
    models = [new_model(tiny_model_dir) for _ in range(3)]
    for param in models[0].parameters():
        param.data.fill_(float("nan"))
    for model, seed in zip(models, (5, 5, 6), strict=True):
        load_dummy(model, seed=seed)
    pairs = zip(models[0].parameters(), models[1].parameters(), models[2].parameters(), strict=True)
    for a, b, c in pairs:
        assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)


def test_runner_dummy_load_from_a_bare_config_json(tiny_model_dir, tmp_path, make_step):
    config_only = tmp_path / "config.json"
    shutil.copy(tiny_model_dir / "config.json", config_only)
    cache = CacheConfig(num_blocks=4, block_size=4)
    config = EngineConfig(model=str(config_only), load_format="dummy", device="cpu", cache=cache)
    runner = ModelRunner(config)
    logits = runner.execute(make_step([([1, 2, 3, 4, 5], 5, [3, 1])], 4))
    assert logits.shape == (1, runner.model_config.vocab_size) and torch.isfinite(logits).all()


def test_make_tiny_model_cli_writes_a_loadable_variant(tmp_path, capsys):
    from cluster.cli import main

    folder = tmp_path / "cli-qwen3"
    assert main(["make-tiny-model", str(folder), "--variant", "qwen3", "--layers", "3"]) == 0
    assert str(folder) in capsys.readouterr().out
    config = ModelConfig.from_path(folder)
    assert (config.architecture, config.num_layers, config.head_dim) == ("Qwen3ForCausalLM", 3, 32)
    load_checkpoint(new_model(folder), folder)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()
    }
