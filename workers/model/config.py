"""`ModelConfig`: the model facts kvrelay needs, parsed once from a Hugging Face config.json.

Reads both the transformers 4 spelling (`rope_theta`, `rope_scaling`, `torch_dtype`) and the
transformers 5 spelling (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import InvalidModelConfig, UnsupportedArchitecture
from workers.model.gguf_file import GGUFFile, is_gguf
from workers.model.gguf_loader import config_dict

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. rope_type 'llama3' uses all fields; 'linear' uses factor."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool
    """Bias on q/k/v projections (Qwen2; Llama with attention_bias)."""
    o_bias: bool
    """Bias on the output projection (Llama/Mistral with attention_bias only)."""
    qk_norm: bool
    """Per-head RMSNorm of q and k before RoPE (Qwen3)."""
    torch_dtype: str
    sliding_window: int | None
    """Attention window when the checkpoint enables one (Mistral v0.1, some Qwen2). kvrelay
    attends fully, which is exact only up to this length, so the runner caps max_model_len."""
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        """Reads `path` (a checkpoint folder, a config.json file or a GGUF file)."""
        path = Path(path)
        if is_gguf(path):
            return cls.from_dict(config_dict(GGUFFile(path)))
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise InvalidModelConfig(str(file), "config.json not found")
        return cls.from_dict(json.loads(file.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architectures = raw.get("architectures") or ["<none>"]
        arch = architectures[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(arch, SUPPORTED_ARCHITECTURES)
        _check_supported_features(raw)
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(raw.get("attention_bias", False))
        rope_theta, rope_scaling = _parse_rope(raw)
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            sliding_window=_sliding_window(raw, arch),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
        )


def _check_supported_features(raw: dict[str, Any]) -> None:
    # Silently ignoring these would load fine and generate garbage; refuse instead.
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise InvalidModelConfig("hidden_act", f"{activation!r} is not supported (only 'silu')")
    if raw.get("mlp_bias"):
        raise InvalidModelConfig("mlp_bias", "biases in the MLP are not supported")


def _sliding_window(raw: dict[str, Any], arch: str) -> int | None:
    # Qwen configs carry a sliding_window value even when use_sliding_window is false.
    if arch.startswith("Qwen") and not raw.get("use_sliding_window", False):
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise InvalidModelConfig("rope_scaling", f"rope_type {rope_type!r} is not supported")
    if rope_type == "default":
        return theta, None
    defaults = RopeScaling()
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", defaults.factor)),
        low_freq_factor=float(scaling.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(scaling.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            scaling.get(
                "original_max_position_embeddings", defaults.original_max_position_embeddings
            )
        ),
    )
