"""Loading weights into a model from a Hugging Face checkpoint folder, a GGUF file (dequantized
at load, see workers/model/gguf_loader.py), or random ('dummy').

The model says which tensors it needs (`checkpoint_map()`: HF name -> slot); this module finds
them in one or many *.safetensors files (through model.safetensors.index.json when present),
checks each full shape against the slot's and lets the slot cut out its TP shard. Tensors the
model does not need (other pipeline stages' layers, rotary caches) are never read. A folder
whose config.json has a quantization_config (GPTQ, AWQ, INT8/FP8 compressed-tensors) loads its
projections kept quantized (workers/model/quant/loading.py); `--quantization fp8|int8` quantizes
an unquantized checkpoint's projections while loading (workers/model/quant/load_mode.py).
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from workers.errors import CheckpointFileMissing, InvalidTensor, MissingTensor, TensorShapeMismatch
from workers.model.gguf_file import GGUFFile, is_gguf
from workers.model.gguf_loader import gguf_name, hf_tensor
from workers.model.kv_scales import load_kv_scales
from workers.model.llama import CheckpointSlot, LlamaForCausalLM
from workers.model.quant.load_mode import LoadMode, resolve_load_mode
from workers.model.quant.loading import load_gguf_q4, load_quantized, quantize_projections
from workers.model.quant.scheme import QuantScheme, read_scheme

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointFileMissing(str(file), f"listed in {INDEX_FILE} but not found")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointFileMissing(str(folder), "no *.safetensors file in this folder")
    files = {}
    for file in shards:
        with safe_open(str(file), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), file))
    return files


def load_checkpoint(
    model: LlamaForCausalLM, folder: str | Path, quantization: str = "auto",
    kv_cache_dtype: str = "auto",
) -> None:
    """Fills every parameter of `model` from the checkpoint at `folder` (or GGUF file).

    `quantization`: the `--quantization` choice (workers/model/quant/load_mode.py): a GGUF
    file's Q4 projections kept 4-bit or dequantized, dense projections quantized to FP8/INT8
    while loading. With `kv_cache_dtype` 'fp8', the checkpoint's per-layer KV-cache scales
    (workers/model/kv_scales.py), if it has any, replace the default 1.0.
    Raises MissingTensor or TensorShapeMismatch naming the HF tensor (and both shapes); for a
    GGUF file MissingTensor or InvalidTensor naming the GGUF tensor and its format;
    InvalidModelConfig for a quantization the checkpoint cannot take; InvalidTensor for a bad
    KV-cache scale."""
    device = next(model.parameters()).device
    mode = resolve_load_mode(folder, quantization, device.type)
    if is_gguf(folder):
        load_gguf(model, GGUFFile(folder), mode)
        if kv_cache_dtype == "fp8":
            load_kv_scales(model, lambda name: None, str(folder))
        return
    slots = model.checkpoint_map()
    files = checkpoint_files(folder)
    scheme = read_scheme(folder)
    with _TensorReader(files) as read:
        if scheme is not None:
            slots = load_quantized(slots, scheme, read)
        elif mode.at_load is not None:
            slots = quantize_projections(slots, mode.at_load, _dense_reader(read, folder, device))
        if kv_cache_dtype == "fp8":
            load_kv_scales(model, read, str(folder))
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in slots:
        if name not in files:
            raise MissingTensor(name, str(folder))
        by_file[files[name]].append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                _load_one(name, slots[name], f.get_tensor(name))


def _dense_reader(read: _TensorReader, folder: str | Path, device: torch.device):
    """The dense weights to quantize at load, checked, moved to the model's device first so
    the rounding runs there (on the GPU when serving on one)."""

    def dense(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = read(name)
        if tensor is None:
            raise MissingTensor(name, str(folder))
        if tuple(tensor.shape) != shape:
            raise TensorShapeMismatch(name, shape, tuple(tensor.shape))
        return tensor.to(device)

    return dense


class _TensorReader:
    """Checkpoint tensor name -> tensor (None if absent), each file opened once."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles: dict[Path, Any] = {}
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> _TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def __call__(self, name: str) -> torch.Tensor | None:
        file = self.files.get(name)
        if file is None:
            return None
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(
                safe_open(str(file), framework="pt", device="cpu"))
        return self.handles[file].get_tensor(name)


def load_gguf(model: LlamaForCausalLM, gguf: GGUFFile, mode: LoadMode | None = None) -> None:
    """Fills every parameter of `model` from a GGUF file, dequantized to float32 on the way;
    with `mode.keep_gguf`, projections stored Q4_0 / Q4_1 stay 4-bit (W4A16); with
    `mode.at_load` (an F32/F16/BF16 file), projections are quantized to FP8/INT8."""
    mode = mode or LoadMode()
    slots = model.checkpoint_map()
    for name in slots:
        if gguf_name(name) not in gguf.tensors:
            raise MissingTensor(gguf_name(name), str(gguf.path))
    if mode.keep_gguf:
        slots = load_gguf_q4(slots, gguf)
    if mode.at_load is not None:
        device = next(model.parameters()).device
        slots = quantize_projections(
            slots, mode.at_load, lambda name, _: hf_tensor(gguf, name).to(device))
    for hf_name, slot in slots.items():
        name = gguf_name(hf_name)
        tensor = hf_tensor(gguf, hf_name)
        if tuple(tensor.shape) != slot.full_shape:
            raise InvalidTensor(
                name, gguf.tensors[name].format,
                f"shape {list(slot.full_shape)} (for {hf_name})", f"shape {list(tensor.shape)}",
            )
        slot.load(tensor)


def _load_one(name: str, slot: CheckpointSlot, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != slot.full_shape:
        raise TensorShapeMismatch(name, slot.full_shape, tuple(tensor.shape))
    slot.load(tensor)


def random_tensor(
    name: str, shape: tuple[int, ...], seed: int, std: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The float32 random tensor of checkpoint name `name`: deterministic per (seed, name,
    device), independent of TP rank. Norm weights are 1 + noise (so a missed load shows)."""
    tensor_seed = seed * 1_000_003 + zlib.crc32(name.encode())
    generator = torch.Generator(device=device).manual_seed(tensor_seed)
    tensor = torch.randn(shape, generator=generator, device=device) * std
    if name.endswith("norm.weight"):
        tensor += 1.0
    return tensor


def random_tensors(
    model: LlamaForCausalLM, seed: int, std: float, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full-shape random float32 tensors for every checkpoint name of `model` (so a TP run
    sees the same weights as a single-rank run)."""
    for name, slot in model.checkpoint_map().items():
        yield name, random_tensor(name, slot.full_shape, seed, std, device)


def load_dummy(
    model: LlamaForCausalLM, seed: int = 0, std: float = 0.02, scheme: QuantScheme | None = None
) -> None:
    """Random weights for any config: real shapes without a checkpoint (benchmarks, tests).
    With a quantization `scheme`, the projections are the random weights quantized in its
    format (round-to-nearest) and kept quantized."""
    device = next(model.parameters()).device
    slots = model.checkpoint_map()
    if scheme is not None:
        slots = quantize_projections(
            slots, scheme, lambda name, shape: random_tensor(name, shape, seed, std, device)
        )
    for name, slot in slots.items():
        _load_one(name, slot, random_tensor(name, slot.full_shape, seed, std, device))
