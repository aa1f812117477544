"""Quantized checkpoint formats (workers/model/quant/): 4-bit packing round trips, GPTQ and AWQ
dequantization against decoders written here from the formats' descriptions, round-to-nearest
error bounds, quantization_config parsing, and loading errors that name the tensor, the format
and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.errors import InvalidModelConfig, InvalidTensor
from workers.model.quant.awq import read_awq, write_awq
from workers.model.quant.checkpoint_tensors import ProjectionTensors
from workers.model.quant.compressed import read_channelwise, write_channelwise
from workers.model.quant.gptq import read_gptq, write_gptq
from workers.model.quant.packing import AWQ_ORDER, pack_int4, unpack_int4
from workers.model.quant.scheme import QuantScheme, parse_scheme
from workers.model.quantize import quantization_config, quantize_checkpoint
from workers.model.weights import load_checkpoint

GPTQ = QuantScheme("gptq", 32, zero_offset=1)


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def projection(tensors, scheme, n, k, prefix="layer.proj") -> ProjectionTensors:
    return ProjectionTensors(prefix, tensors, scheme, k, n)


@pytest.mark.parametrize("order", [tuple(range(8)), AWQ_ORDER])
@pytest.mark.parametrize("dim", [0, 1])
def test_int4_packing_round_trips(order, dim):
    values = torch.randint(0, 16, (24, 40), generator=torch.Generator().manual_seed(3))
    packed = pack_int4(values, dim, order)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] * 8 == values.shape[dim]
    assert torch.equal(unpack_int4(packed, dim, order), values.to(torch.int32))


def test_int4_packing_puts_element_order_i_in_nibble_i():
    values = torch.arange(8).reshape(1, 8)
    assert pack_int4(values, 1).item() == 0x76543210
    # AWQ: nibbles hold elements 0, 2, 4, 6, 1, 3, 5, 7 (low nibble first).
    assert pack_int4(values, 1, AWQ_ORDER).item() == 0x75316420
    assert pack_int4(torch.full((1, 8), 15), 1).item() == -1  # 0xFFFFFFFF as int32


def nibble(word: int, index: int) -> int:
    return (word >> (4 * index)) & 0xF


def gptq_dequantize_by_hand(t: dict[str, torch.Tensor], k: int, n: int) -> torch.Tensor:
    """The GPTQ format read one element at a time: w[k, n] = (q - (z + 1)) * s[g_idx[k], n]."""
    out = torch.empty(n, k)
    for row in range(k):
        g = int(t["g_idx"][row])
        for col in range(n):
            q = nibble(int(t["qweight"][row // 8, col]), row % 8)
            z = nibble(int(t["qzeros"][g, col // 8]), col % 8) + 1
            out[col, row] = (q - z) * float(t["scales"][g, col])
    return out


def awq_dequantize_by_hand(t: dict[str, torch.Tensor], k: int, n: int, group: int):
    """The AWQ format read one element at a time (column c of eight is in nibble i where
    AWQ_ORDER[i] == c)."""
    out = torch.empty(n, k)
    for row in range(k):
        for col in range(n):
            slot = AWQ_ORDER.index(col % 8)
            q = nibble(int(t["qweight"][row, col // 8]), slot)
            z = nibble(int(t["qzeros"][row // group, col // 8]), slot)
            out[col, row] = (q - z) * float(t["scales"][row // group, col])
    return out


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dequantization_equals_the_format_read_by_hand(act_order):
    n, k = 16, 96
    weight = random_weight(n, k)
    importance = torch.rand(k, generator=torch.Generator().manual_seed(1)) if act_order else None
    tensors = write_gptq(weight, 32, importance)
    assert tensors["qweight"].shape == (k // 8, n) and tensors["qzeros"].shape == (3, n // 8)
    assert tensors["scales"].dtype == torch.float16
    assert (torch.bincount(tensors["g_idx"].long()) == 32).all()
    assert act_order == (not torch.equal(tensors["g_idx"].long(), torch.arange(k) // 32))
    loaded = read_gptq(projection(tensors, GPTQ, n, k))
    assert (loaded.perm is not None) == act_order
    expected = gptq_dequantize_by_hand(tensors, k, n)
    assert torch.equal(loaded.dequantize(), expected)
    # Round-to-nearest: every weight within one step (its group's scale); clamping at the
    # ends of the 4-bit range can cost more than half a step.
    step = tensors["scales"].float()[tensors["g_idx"].long()].T
    assert ((expected - weight).abs() <= step + 1e-6).all()


def test_awq_dequantization_equals_the_format_read_by_hand():
    n, k, group = 24, 64, 16
    weight = random_weight(n, k)
    tensors = write_awq(weight, group)
    assert tensors["qweight"].shape == (k, n // 8) and tensors["qzeros"].shape == (4, n // 8)
    loaded = read_awq(projection(tensors, QuantScheme("awq", group), n, k))
    expected = awq_dequantize_by_hand(tensors, k, n, group)
    assert torch.equal(loaded.dequantize(), expected)
    step = tensors["scales"].float().repeat_interleave(group, 0).T
    assert ((expected - weight).abs() <= step + 1e-6).all()


def test_gptq_v2_zero_points_are_stored_without_the_offset():
    n, k = 8, 32
    tensors = write_gptq(random_weight(n, k), 32)
    tensors["qzeros"] = pack_int4(unpack_int4(tensors["qzeros"], 1) + 1, 1)
    v1 = read_gptq(projection(write_gptq(random_weight(n, k), 32), GPTQ, n, k))
    v2 = read_gptq(projection(tensors, QuantScheme("gptq", 32, zero_offset=0), n, k))
    assert torch.equal(v1.dequantize(), v2.dequantize())


@pytest.mark.parametrize("method,bound", [("int8", 1 / 254), ("fp8", 1 / 16)])
def test_channelwise_round_trip_is_within_a_step(method, bound):
    weight = random_weight(32, 48)
    tensors = write_channelwise(weight, method)
    assert tensors["weight_scale"].shape == (32, 1)
    loaded = read_channelwise(projection(tensors, QuantScheme(method), 32, 48))
    amax = weight.abs().amax(1, keepdim=True)
    assert ((loaded.dequantize() - weight).abs() <= amax * bound + 1e-7).all()


def test_scheme_reads_hugging_face_quantization_configs():
    assert parse_scheme(quantization_config("gptq", 128, True)) == QuantScheme("gptq", 128, 1)
    assert parse_scheme({**quantization_config("gptq", 64, False),
                         "checkpoint_format": "gptq_v2"}) == QuantScheme("gptq", 64, 0)
    assert parse_scheme(quantization_config("awq", 128, False)) == QuantScheme("awq", 128)
    assert parse_scheme(quantization_config("int8", 0, False)).method == "int8"
    assert parse_scheme(quantization_config("fp8", 0, False)).method == "fp8"
    with pytest.raises(InvalidModelConfig, match="bits"):
        parse_scheme({**quantization_config("gptq", 128, False), "bits": 3})
    with pytest.raises(InvalidModelConfig, match="version"):
        parse_scheme({**quantization_config("awq", 128, False), "version": "gemv"})
    with pytest.raises(InvalidModelConfig, match="bitsandbytes"):
        parse_scheme({"quant_method": "bitsandbytes"})


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tiny_model_dir):
    return quantize_checkpoint(str(tiny_model_dir), tmp_path_factory.mktemp("gptq"), "gptq", 32)


def broken_copy(source, folder, edit_config=None, drop=None):
    """A copy of a checkpoint with its config edited and/or one tensor removed."""
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"].update(edit_config)
        (folder / "config.json").write_text(json.dumps(config))
    if drop:
        tensors = load_file(str(folder / "model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def load_into_fresh_model(folder):
    from workers.attention.torch_backend import TorchAttentionBackend
    from workers.model.config import ModelConfig
    from workers.model.llama import LlamaForCausalLM

    model = LlamaForCausalLM(ModelConfig.from_path(folder), TorchAttentionBackend())
    load_checkpoint(model, folder)
    return model


def test_wrong_group_size_names_the_scales_tensor_format_and_expected_shape(gptq_dir, tmp_path):
    folder = broken_copy(gptq_dir, tmp_path / "bad", edit_config={"group_size": 16})
    with pytest.raises(InvalidTensor) as error:
        load_into_fresh_model(folder)
    message = str(error.value)
    assert error.value.name == "model.layers.0.self_attn.o_proj.qzeros"
    assert "GPTQ 4-bit, group size 16" in message
    assert "4 groups of 16 input rows" in message and "found torch.int32 [2, 8]" in message


def test_missing_scales_names_the_tensor_and_format(gptq_dir, tmp_path):
    name = "model.layers.1.mlp.down_proj.scales"
    folder = broken_copy(gptq_dir, tmp_path / "bad", drop=name)
    with pytest.raises(InvalidTensor, match="no such tensor") as error:
        load_into_fresh_model(folder)
    assert error.value.name == name and error.value.format == "GPTQ 4-bit, group size 32"


def test_int8_weight_stored_as_float_is_refused_naming_the_dtype(tiny_model_dir, tmp_path):
    source = quantize_checkpoint(str(tiny_model_dir), tmp_path / "int8", "int8")
    tensors = load_file(str(source / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].float()
    save_file(tensors, str(source / "model.safetensors"))
    with pytest.raises(InvalidTensor, match=r"expected int8 \[128, 64\].*found torch.float32"):
        load_into_fresh_model(source)


def test_quantize_command_writes_a_checkpoint_that_loads_kept_quantized(tiny_model_dir, tmp_path,
                                                                         capsys):
    from cluster.cli import main as kvrelay

    out = tmp_path / "awq"
    argv = ["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--format", "awq",
            "--group-size", "32"]
    assert kvrelay(argv) == 0
    assert "round-to-nearest" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == quantization_config("awq", 32, False)
    assert (out / "tokenizer.json").is_file()
    model = load_into_fresh_model(out)
    assert model.layers["0"].mlp.down_proj.quantized.group_size == 32
    # A quantized checkpoint is not quantized twice; act-order is GPTQ's option only.
    assert kvrelay(["quantize", "--model", str(out), "--out", str(tmp_path / "again"),
                    "--format", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kvrelay(argv[:-2] + ["--act-order"])


def autoawq_packing_utils():
    """AutoAWQ's awq/utils/packing_utils.py (plain torch), loaded by path so that the awq
    package's __init__ (models, kernels) is not imported; skips when AutoAWQ is absent."""
    import importlib.util

    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("AutoAWQ is not installed")
    path = f"{list(spec.submodule_search_locations)[0]}/utils/packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_awq_dequantization_equals_autoawq_dequantize_gemm():
    n, k, group = 48, 256, 64
    tensors = write_awq(random_weight(n, k, seed=5), group)
    theirs = autoawq_packing_utils().dequantize_gemm(
        tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, group)
    ours = read_awq(projection(tensors, QuantScheme("awq", group), n, k)).dequantize()
    assert theirs.dtype == torch.float16
    assert torch.equal(ours.T.half(), theirs)
