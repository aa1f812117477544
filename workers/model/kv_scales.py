"""Per-layer FP8 KV-cache scales carried by a checkpoint (`--kv-cache-dtype fp8`), and their
calibration (`kvrelay quantize --kv-cache-scales`).

A cache element stores `x / scale` in e4m3 (kernels/kv_quant.py); each attention layer has
one K and one V scale, float32 buffers the cache write and both attention kernels read
(workers/model/llama.py, 1.0 by default: vLLM's default without checkpoint scales). The names
checkpoints use, as vLLM's loader reads them, first found wins:

    model.layers.N.self_attn.k_scale / v_scale           compressed-tensors (llm-compressor)
    model.layers.N.self_attn.k_proj.k_scale / v_proj.v_scale     NVIDIA ModelOpt
    model.layers.N.self_attn.kv_scale                    older AutoFP8: one scale for K and V

each a float of shape [] or [1]. A checkpoint with none keeps 1.0 (one log line); one with
some layers' scales but not all, or a scale of another shape or not finite and positive, is
refused naming the tensor. Prefill and decode workers load the same checkpoint (one
EngineConfig per cluster), so they quantize and dequantize with the same scales.

Calibration: the max |K| (after RoPE: what the cache stores) and max |V| of each layer over a
few prompts, scale = max / 448 (e4m3's largest value), as llm-compressor's static
per-tensor KV scales.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from kernels.kv_quant import FP8_MAX
from workers.attention.backend import AttentionMetadata
from workers.errors import InvalidTensor, MissingTensor
from workers.model.gguf_file import is_gguf
from workers.model.llama import LlamaForCausalLM
from workers.model.quant.loading import TensorReader

log = logging.getLogger(__name__)

SCALE_NAMES = {
    "k": ("self_attn.k_scale", "self_attn.k_proj.k_scale", "self_attn.kv_scale"),
    "v": ("self_attn.v_scale", "self_attn.v_proj.v_scale", "self_attn.kv_scale"),
}
"""Suffixes after `model.layers.N.`, in the order they are looked for."""
FORMAT = "FP8 KV-cache scale"
CALIBRATION_PROMPTS = (
    "The capital of France is Paris, and the river Seine flows through it.",
    "Once upon a time, in a small village at the edge of a forest, there lived a girl.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Water boils at one hundred degrees Celsius at sea level and freezes at zero.",
)


def scale_names(layer: int | str) -> dict[str, str]:
    """The names `kvrelay quantize --kv-cache-scales` writes (compressed-tensors')."""
    return {kind: f"model.layers.{layer}.{names[0]}" for kind, names in SCALE_NAMES.items()}


def load_kv_scales(model: LlamaForCausalLM, read: TensorReader, checkpoint: str) -> bool:
    """Copies the checkpoint's K and V scales of each of `model`'s layers into its attention
    buffers; False (and one log line) when the checkpoint has none. Raises MissingTensor
    for a layer without scales when others have them, InvalidTensor for a bad scale."""
    found, missing = 0, []
    for index, layer in model.layers.items():
        attn = layer.self_attn
        for kind, buffer in (("k", attn.k_scale), ("v", attn.v_scale)):
            names = [f"model.layers.{index}.{suffix}" for suffix in SCALE_NAMES[kind]]
            name, tensor = next(((n, t) for n in names if (t := read(n)) is not None),
                                (names[0], None))
            if tensor is None:
                missing.append(name)
                continue
            buffer.copy_(_checked_scale(name, tensor))
            found += 1
    if found and missing:
        raise MissingTensor(missing[0], checkpoint)
    if not found:
        log.info("%s has no KV-cache scales (model.layers.N.self_attn.k_scale / v_scale): "
                 "the fp8 KV cache uses scales of 1.0", checkpoint)
    return bool(found)


def model_kv_scales(model: LlamaForCausalLM) -> tuple[tuple[int, float, float], ...]:
    """(layer, k_scale, v_scale) of each of `model`'s layers: what a KV-transfer pair's
    handshake compares (workers/kv_transfer/layout.py), so two workers that quantize the
    cache with different scales refuse each other."""
    return tuple((int(index), float(layer.self_attn.k_scale), float(layer.self_attn.v_scale))
                 for index, layer in model.layers.items())


def _checked_scale(name: str, tensor: torch.Tensor) -> torch.Tensor:
    expected = "one positive finite float per layer, shape [] or [1]"
    found = f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
    if tensor.numel() != 1 or tensor.dim() > 1 or not tensor.is_floating_point():
        raise InvalidTensor(name, FORMAT, expected, found)
    value = float(tensor.float().reshape(()))
    if not (math.isfinite(value) and value > 0):
        raise InvalidTensor(name, FORMAT, expected, f"{found} = {value}")
    return tensor.float().reshape(1)


def calibrate_kv_scales(source: str | Path, prompts: tuple[str, ...] = CALIBRATION_PROMPTS
                        ) -> dict[str, torch.Tensor]:
    """Checkpoint name -> float32 [1] scale (max |x| / 448) of every layer's K and V, from
    the unquantized model at `source` (folder or GGUF file) in float32 on the CPU, each
    prompt prefilled alone."""
    from workers.attention.torch_backend import TorchAttentionBackend
    from workers.model.config import ModelConfig
    from workers.model.weights import load_checkpoint
    from workers.text.tokenizer import Tokenizer

    model = LlamaForCausalLM(ModelConfig.from_path(source), TorchAttentionBackend()).eval()
    load_checkpoint(model, source, "none" if is_gguf(source) else "auto")
    tokenizer = Tokenizer(source)
    amax = {index: torch.zeros(2) for index in model.layers}
    with torch.no_grad():
        for prompt in prompts:
            for index, (k, v) in zip(model.layers, _prefill_caches(model, tokenizer.encode(prompt)),
                                     strict=True):
                amax[index] = torch.maximum(amax[index], torch.stack([k.abs().max(),
                                                                      v.abs().max()]))
    scales = {}
    for index, (k_max, v_max) in amax.items():
        names = scale_names(index)
        for kind, value in (("k", k_max), ("v", v_max)):
            scale = value / FP8_MAX if value > 0 else torch.tensor(1.0)
            scales[names[kind]] = scale.reshape(1).float()
    return scales


def _prefill_caches(model: LlamaForCausalLM, ids: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """One prefill of `ids` into float32 caches of one block of len(ids) slots; returns each
    layer's (K, V) cache: exactly the values an fp8 cache would quantize."""
    cfg, n = model.config, len(ids)
    shape = (1, n, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32), max_query_len=n, max_seq_len=n,
        query_start_loc_host=(0, n), seq_lens_host=(n,),
    )
    model(torch.tensor(ids), torch.arange(n), caches, meta)
    return caches
