"""Helpers of the quantized-checkpoint tests (test_quant_model.py, test_quant_lm_head.py): a
model loaded from a checkpoint folder, and the plain checkpoint that is a quantized one
dequantized (the reference a quantized model must reproduce)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from workers.attention.torch_backend import TorchAttentionBackend
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.parallel import ParallelContext
from workers.model.quant.checkpoint_tensors import ProjectionTensors
from workers.model.quant.loading import FORMATS, is_quantized_slot
from workers.model.quant.scheme import read_scheme
from workers.model.weights import load_checkpoint


def build_model(folder: Path, parallel: ParallelContext | None = None) -> LlamaForCausalLM:
    config = ModelConfig.from_path(folder)
    model = LlamaForCausalLM(config, TorchAttentionBackend(), parallel or ParallelContext())
    load_checkpoint(model, folder)
    return model


def dequantized_copy(quantized: Path, out: Path) -> Path:
    """A plain checkpoint whose quantized weights (projections, and the LM head if the scheme
    quantizes it) are dequantized (float32), decoded by the formats' readers from the
    checkpoint tensors themselves."""
    out.mkdir()
    scheme = read_scheme(quantized)
    stored = load_file(str(quantized / "model.safetensors"))
    slots = build_model(quantized).checkpoint_map()
    fmt = FORMATS[scheme.method]
    tensors = {}
    for name, slot in slots.items():
        if not is_quantized_slot(slot, scheme.lm_head):
            tensors[name] = stored[name]
            continue
        prefix = name.removesuffix(".weight")
        parts = {s: stored[f"{prefix}.{s}"] for s in fmt.suffixes if f"{prefix}.{s}" in stored}
        n, k = slot.full_shape
        tensors[name] = fmt.read(ProjectionTensors(prefix, parts, scheme, k, n)).dequantize()
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "model.safetensors"))
    config = json.loads((quantized / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (out / name).write_bytes((quantized / name).read_bytes())
    return out
