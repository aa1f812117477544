"""GGUF checkpoints for the Llama-family engine: the file's metadata as a Hugging Face config
dict, and its tensors under Hugging Face names, dequantized to float32.

llama.cpp's converter renames tensors (`blk.{i}.attn_q.weight` for
`model.layers.{i}.self_attn.q_proj.weight`, ...) and, for the `llama` architecture only,
permutes the rows of q_proj and k_proj within each head from rotate-half order (first half of
the head, then second half) into interleaved pairs, because ggml's RoPE rotates adjacent
pairs. `hf_tensor` undoes that permutation, so the engine's rotate-half RoPE sees the original
layout. Qwen2/Qwen3 files keep rotate-half order (ggml's NEOX RoPE), so nothing is undone.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from workers.errors import InvalidModelConfig, MissingTensor, UnsupportedArchitecture
from workers.model.gguf_file import GGUFFile

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""GGUF `general.architecture` -> the Hugging Face architecture the engine runs it as
(llama.cpp writes Llama, Mistral and SmolLM checkpoints as `llama`)."""

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")

_FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
"""`general.file_type` of unquantized files -> their dtype; quantized files say bfloat16 (the
dtype `--dtype auto` picks on CUDA), the dtype the Llama-family checkpoints were trained in."""


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name llama.cpp's converter writes for a Hugging Face tensor name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    layer, module, param = _LAYER_TENSOR.fullmatch(hf_name).groups()
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{param}"


def config_dict(gguf: GGUFFile) -> dict[str, Any]:
    """The Hugging Face config.json equivalent of the file's metadata (for ModelConfig)."""
    arch = gguf.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitecture(f"GGUF {arch}", tuple(ARCHITECTURES))
    if "rope_freqs.weight" in gguf.tensors:
        raise InvalidModelConfig(
            "rope_freqs.weight", "per-frequency RoPE factors (Llama 3.1 scaling) are not supported"
        )
    heads = int(gguf.require(f"{arch}.attention.head_count"))
    hidden = int(gguf.require(f"{arch}.embedding_length"))
    head_dim = int(gguf.metadata.get(f"{arch}.attention.key_length", hidden // heads))
    _check_rotary_dims(gguf, arch, head_dim)
    metadata = gguf.metadata
    return {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": _vocab_size(gguf),
        "hidden_size": hidden,
        "intermediate_size": int(gguf.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(gguf.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(metadata.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(gguf.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(gguf, arch),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in gguf.tensors,
        "torch_dtype": _FILE_TYPE_DTYPES.get(metadata.get("general.file_type"), "bfloat16"),
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }


def _vocab_size(gguf: GGUFFile) -> int:
    if "token_embd.weight" not in gguf.tensors:
        raise MissingTensor("token_embd.weight", str(gguf.path))
    return gguf.tensors["token_embd.weight"].shape[0]


def _check_rotary_dims(gguf: GGUFFile, arch: str, head_dim: int) -> None:
    rotary = int(gguf.metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise InvalidModelConfig(
            f"{arch}.rope.dimension_count",
            f"partial rotary ({rotary} of {head_dim} head dims) is not supported",
        )


def _rope_scaling(gguf: GGUFFile, arch: str) -> dict[str, Any] | None:
    rope_type = gguf.metadata.get(f"{arch}.rope.scaling.type", "none")
    if rope_type == "none":
        return None
    # ModelConfig refuses the types the engine does not implement (yarn, longrope).
    return {"rope_type": rope_type, "factor": gguf.metadata.get(f"{arch}.rope.scaling.factor")}


def hf_tensor(gguf: GGUFFile, hf_name: str) -> torch.Tensor:
    """The float32 tensor for a Hugging Face name, its rows back in Hugging Face order.
    The caller has checked that `gguf_name(hf_name)` is in the file."""
    tensor = gguf.dequantize(gguf_name(hf_name))
    heads = rotary_heads(gguf, hf_name)
    return tensor if heads is None else unpermute_rotary(tensor, heads)


def rotary_heads(gguf: GGUFFile, hf_name: str) -> int | None:
    """The number of heads whose rows llama.cpp permuted in this tensor (q_proj, k_proj of
    the `llama` architecture), None when its rows are in Hugging Face order."""
    if gguf.metadata.get("general.architecture") != "llama":
        return None
    heads = int(gguf.require("llama.attention.head_count"))
    if ".self_attn.q_proj." in hf_name:
        return heads
    if ".self_attn.k_proj." in hf_name:
        return int(gguf.metadata.get("llama.attention.head_count_kv", heads))
    return None


def unpermute_rotary(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows [head, pair, 2] (interleaved, GGUF) -> [head, 2, pair] (rotate-half, HF)."""
    rest = tensor.shape[1:]
    per_head = tensor.reshape(num_heads, -1, 2, *rest)
    return per_head.transpose(1, 2).reshape(tensor.shape)
