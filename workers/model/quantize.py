"""`kvrelay quantize`: writes a quantized copy of a checkpoint that `--model DIR` serves kept
quantized.

    kvrelay quantize --model SRC --out DIR [--format gptq|awq|int8|fp8] [--group-size 128]
                     [--act-order] [--lm-head] [--kv-cache-scales]

SRC is a checkpoint folder, a GGUF file or a packaged model (smollm2). The decoder layers'
q/k/v/o/gate/up/down projections are quantized by ROUND-TO-NEAREST (no calibration data, no
GPTQ error feedback, no AWQ activation-aware scaling), written in the layout Hugging Face
stores for that method: GPTQ (symmetric, 'gptq' checkpoint format; --act-order groups input
rows by decreasing weight norm and writes the matching g_idx), AWQ (GEMM, asymmetric),
compressed-tensors INT8 / FP8 (e4m3) with one scale per output channel. Other tensors are
copied unchanged, config.json gains the quantization_config, and the tokenizer files are
copied (or, from a GGUF file, written from its metadata). The quality is what RTN gives, so
these checkpoints are test and benchmark inputs, not a substitute for GPTQ or AWQ.

--lm-head quantizes the LM head (lm_head.weight) too, in the same format, and says so as the
real tools do: GPTQ `"lm_head": true` (AutoGPTQ / GPTQModel), AWQ the same key (which vLLM's
AWQ-Marlin config reads), compressed-tensors an `ignore` list without lm_head. A model with
tied embeddings is refused (its head is the input embedding, which stays dense;
workers/model/quant/scheme.py).

--kv-cache-scales adds per-layer FP8 KV-cache scales (model.layers.N.self_attn.k_scale and
v_scale, float32 [1]: max |K| / 448 and max |V| / 448 over a few built-in prompts run through
the unquantized model; workers/model/kv_scales.py), which `--kv-cache-dtype fp8` then uses
instead of 1.0. Without --format the weights are copied as stored.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workers.errors import InvalidModelConfig, KvrelayError
from workers.model.gguf_file import GGUFFile, is_gguf
from workers.model.gguf_loader import config_dict, hf_tensor
from workers.model.kv_scales import calibrate_kv_scales
from workers.model.model_source import check_model_path, resolve_model_path
from workers.model.quant.formats import FORMATS
from workers.model.quant.packing import PACK
from workers.model.quant.scheme import LM_HEAD, check_head_untied

PROJECTION = re.compile(
    r"(model\.layers\.\d+\.)(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight"
)
HEAD = re.compile(r"()(lm_head)\.weight")
"""The LM head's weight, matched like a projection (no prefix) under --lm-head."""
SHARED_INPUTS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)
"""Projections that read the same input share one act-order (GPTQ orders rows by the input's
statistics), so merged q/k/v and gate/up keep one permutation."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                   "symmetric": True}
"""compressed-tensors' description of static per-tensor FP8 KV-cache scales."""


def quantization_config(
    fmt: str, group_size: int, act_order: bool, lm_head: bool = False
) -> dict[str, Any]:
    """The config.json entry transformers (and workers/model/quant/scheme.py) read;
    `lm_head`: the LM head is quantized too."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                "desc_act": act_order, "sym": True, "checkpoint_format": "gptq",
                LM_HEAD: lm_head}
    if fmt == "awq":
        head = {LM_HEAD: True} if lm_head else {}
        return {"quant_method": "awq", "bits": 4, "group_size": group_size,
                "zero_point": True, "version": "gemm", **head}
    weights = {"num_bits": 8, "type": "int" if fmt == "int8" else "float", "symmetric": True,
               "strategy": "channel", "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "format": "naive-quantized" if fmt == "int8" else "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": [] if lm_head else [LM_HEAD],
        "quantization_status": "compressed",
    }


def quantize_tensors(
    tensors: dict[str, torch.Tensor], fmt: str, group_size: int, act_order: bool = False,
    lm_head: bool = False,
) -> dict[str, torch.Tensor]:
    """HF-named tensors -> the quantized checkpoint's tensors (projections, and the LM head if
    `lm_head`, replaced)."""
    out = {}
    for name, tensor in tensors.items():
        match = PROJECTION.fullmatch(name) or (HEAD.fullmatch(name) if lm_head else None)
        if match is None:
            out[name] = tensor
            continue
        prefix, module = match.groups()
        importance = None
        if act_order:
            siblings = next((g for g in SHARED_INPUTS if module in g), (module,))
            importance = sum(tensors[f"{prefix}{s}.weight"].float().pow(2).sum(0)
                             for s in siblings)
        written = FORMATS[fmt].write(tensor.float(), group_size, importance)
        for suffix, value in written.items():
            out[f"{prefix}{module}.{suffix}"] = value.contiguous()
    return out


def read_source(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json dict, HF-named tensors) of a checkpoint folder or GGUF file."""
    if is_gguf(path):
        gguf = GGUFFile(path)
        return config_dict(gguf), dict(_gguf_tensors(gguf))
    folder = Path(path)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        raise InvalidModelConfig("quantization_config", f"{path} is already quantized")
    return config, tensors


def _gguf_tensors(gguf: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    # The names the engine loads, from a model built on the meta device (no memory).
    from workers.attention.torch_backend import TorchAttentionBackend
    from workers.model.config import ModelConfig
    from workers.model.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.from_dict(config_dict(gguf)), TorchAttentionBackend())
    for name in model.checkpoint_map():
        yield name, hf_tensor(gguf, name)


def write_tokenizer(source: str, out: Path) -> None:
    if not is_gguf(source):
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy(Path(source) / name, out / name)
        return
    from workers.text.gguf_tokenizer import read_gguf_tokenizer

    tokenizer = read_gguf_tokenizer(GGUFFile(source))
    tokenizer.backend.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "chat_template": tokenizer.chat_template}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    end_ids = list(tokenizer.eos_token_ids)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": end_ids}))


def quantize_checkpoint(
    source: str, out: str | Path, fmt: str | None, group_size: int = 128,
    act_order: bool = False, kv_cache_scales: bool = False, lm_head: bool = False,
) -> Path:
    """Writes the quantized checkpoint of `source` to folder `out` (`fmt` None: weights as
    stored), with calibrated KV-cache scales if `kv_cache_scales`, the LM head quantized too
    if `lm_head`; returns it."""
    config, tensors = read_source(source)
    check_head_untied(config, lm_head)
    if lm_head and fmt in ("gptq", "awq") and config["vocab_size"] % PACK:
        raise InvalidModelConfig("vocab_size", f"{config['vocab_size']} is not a multiple of "
                                 f"{PACK}: a 4-bit LM head packs {PACK} vocab rows per int32 "
                                 "word of its zero points (quantize without --lm-head)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt is not None:
        config["quantization_config"] = quantization_config(fmt, group_size, act_order, lm_head)
        tensors = quantize_tensors(tensors, fmt, group_size, act_order, lm_head)
    if kv_cache_scales:
        tensors.update(calibrate_kv_scales(source))
        if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
            config["quantization_config"]["kv_cache_scheme"] = KV_CACHE_SCHEME
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(source, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrelay quantize", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="checkpoint folder, .gguf file or packaged model (smollm2)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--format", default=None, choices=sorted(FORMATS),
                        help="weight format (default: weights copied as stored)")
    parser.add_argument("--group-size", type=int, default=128,
                        help="input rows per scale group (gptq, awq; -1: one group)")
    parser.add_argument("--act-order", action="store_true",
                        help="gptq: group input rows by decreasing weight norm (writes g_idx)")
    parser.add_argument("--lm-head", action="store_true",
                        help="quantize the LM head too (untied models; the config says so)")
    parser.add_argument("--kv-cache-scales", action="store_true",
                        help="add per-layer FP8 KV-cache scales (self_attn.k_scale / v_scale: "
                             "max |K|, |V| / 448 over a few prompts) for --kv-cache-dtype fp8")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.act_order and args.format != "gptq":
        parser.error("--act-order is a GPTQ option")
    if args.lm_head and args.format is None:
        parser.error("--lm-head needs --format")
    if args.format is None and not args.kv_cache_scales:
        parser.error("nothing to write: give --format and/or --kv-cache-scales")
    try:
        source = resolve_model_path(args.model)
        check_model_path(source)
        out = quantize_checkpoint(source, args.out, args.format, args.group_size, args.act_order,
                                  args.kv_cache_scales, args.lm_head)
    except KvrelayError as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    head = " and LM head" if args.lm_head else ""
    what = ([f"{args.format} weights{head} (round-to-nearest)"] if args.format
            else ["weights as stored"])
    what += ["calibrated FP8 KV-cache scales"] if args.kv_cache_scales else []
    print(f"wrote {' and '.join(what)} to {out}")
    return 0
