"""Test-side GGUF files: a tiny checkpoint folder written the way llama.cpp's converter writes
it (GGUF tensor names, q/k rows permuted for `llama`, 2-D weights quantized, byte-level BPE
tokenizer in the metadata), with the `gguf` package's writer and quantizers.

`write_gguf(model_dir, path, qtype)`; keyword arguments break one thing on purpose (a skipped
tensor, a changed metadata value, a tensor stored in another type) for the error tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from workers.model.gguf_loader import gguf_name

GGUF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
CONTROL, NORMAL = 3, 1


def permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: rows of each head from rotate-half order to interleaved pairs."""
    head_rows = weight.shape[0] // num_heads
    per_head = weight.reshape(num_heads, 2, head_rows // 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def config_metadata(config: dict[str, Any], arch: str) -> dict[str, Any]:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    metadata = {
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.rope.freq_base": float(config.get("rope_theta", 10000.0)),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        f"{arch}.vocab_size": config["vocab_size"],
        "general.file_type": 0,
    }
    scaling = config.get("rope_scaling")
    if scaling:
        metadata[f"{arch}.rope.scaling.type"] = scaling["rope_type"]
        metadata[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    return metadata


def tokenizer_metadata(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {added["content"] for added in tokenizer["added_tokens"] if added["special"]}
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [" ".join(pair) for pair in tokenizer["model"]["merges"]],
        "tokenizer.ggml.token_type": [CONTROL if t in special else NORMAL for t in tokens],
        "tokenizer.ggml.bos_token_id": config["bos_token_id"],
        "tokenizer.ggml.eos_token_id": config["eos_token_id"],
        "tokenizer.ggml.eot_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": template,
    }


def gguf_tensors(model_dir: Path, config: dict[str, Any], arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, q/k permuted for llama; no output.weight when tied."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = {}
    for hf_name, array in load_file(str(model_dir / "model.safetensors")).items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        array = array.astype(np.float32)
        if arch == "llama" and ".q_proj." in hf_name:
            array = permute_rotary(array, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            array = permute_rotary(array, kv_heads)
        tensors[gguf_name(hf_name)] = array
    return tensors


def write_gguf(model_dir: Path, path: Path, qtype: Any = None, *, arch: str | None = None,
               metadata: dict[str, Any] | None = None, skip: tuple[str, ...] = (),
               tensor_types: dict[str, Any] | None = None) -> Path:
    """The checkpoint at `model_dir` as a GGUF file at `path`; 2-D weights in `qtype`
    (default F32), 1-D ones in F32. `metadata` overrides keys, `skip` leaves tensors out,
    `tensor_types` stores named tensors in another type (random bytes for types gguf cannot
    quantize)."""
    import gguf

    qtype = gguf.GGMLQuantizationType.F32 if qtype is None else qtype
    config = json.loads((model_dir / "config.json").read_text())
    arch = arch or GGUF_ARCH[config["architectures"][0]]
    values = {**config_metadata(config, arch), **tokenizer_metadata(model_dir, config)}
    values.update(metadata or {})
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in values.items():
        _add_value(writer, key, value)
    tensors = gguf_tensors(model_dir, config, GGUF_ARCH[config["architectures"][0]])
    for name, array in tensors.items():
        if name not in skip:
            chosen = (tensor_types or {}).get(name, qtype if array.ndim == 2 else None)
            _add_tensor(writer, name, array, chosen)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_value(writer: Any, key: str, value: Any) -> None:
    import gguf

    types = gguf.GGUFValueType
    if isinstance(value, list):
        item = types.STRING if isinstance(value[0], str) else types.INT32
        writer.add_key_value(key, value, types.ARRAY, sub_type=item)
        return
    kind = {bool: types.BOOL, int: types.UINT32, float: types.FLOAT32, str: types.STRING}
    writer.add_key_value(key, value, kind[type(value)])


def _add_tensor(writer: Any, name: str, array: np.ndarray, qtype: Any) -> None:
    import gguf

    q = gguf.GGMLQuantizationType
    if qtype is None or qtype == q.F32:
        writer.add_tensor(name, array)
    elif qtype == q.F16:
        writer.add_tensor(name, array.astype(np.float16))
    elif qtype in (q.Q8_0, q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1, q.BF16):
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = array.shape
        raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * block_bytes))
        writer.add_tensor(name, raw.astype(np.uint8), raw_dtype=qtype)
