"""`QuantScheme`: how a checkpoint's linear weights are quantized, read from the
`quantization_config` of its config.json as Hugging Face transformers reads it.

    {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true,
     "checkpoint_format": "gptq"}                                    -> method "gptq"
    {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
     "version": "gemm"}                                              -> method "awq"
    {"quant_method": "compressed-tensors", "format": "naive-quantized" | "float-quantized",
     "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8,
     "type": "int" | "float", "strategy": "channel", ...}}}, "ignore": ["lm_head"]}
                                                                     -> method "int8" / "fp8"

Only the decoder layers' projections are quantized; embeddings, norms and the LM head stay in
the model's dtype (what GPTQ, AWQ and llm-compressor write by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import InvalidModelConfig

METHODS = ("gptq", "awq", "int8", "fp8")
FIELD = "quantization_config"


@dataclass(frozen=True)
class QuantScheme:
    method: str
    """One of METHODS."""
    group_size: int = 0
    """Input rows per scale group (4-bit methods); -1 in a checkpoint means one group."""
    zero_offset: int = 0
    """Added to a stored GPTQ zero point: 1 for the original ('gptq') checkpoint format,
    which stores zero - 1, 0 for 'gptq_v2'."""

    @property
    def label(self) -> str:
        """How error messages name the format: 'GPTQ 4-bit, group size 128'."""
        if self.method in ("gptq", "awq"):
            return f"{self.method.upper()} 4-bit, group size {self.group_size}"
        return f"{self.method.upper()} per-channel (compressed-tensors)"


def read_scheme(path: str | Path) -> QuantScheme | None:
    """The scheme of a checkpoint folder (or config.json), None when it is not quantized."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if file.suffix != ".json" or not file.is_file():
        return None
    raw = json.loads(file.read_text()).get(FIELD)
    return None if raw is None else parse_scheme(raw)


def parse_scheme(raw: dict[str, Any]) -> QuantScheme:
    method = raw.get("quant_method")
    if method == "gptq":
        _require(raw, "bits", 4)
        fmt = raw.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise InvalidModelConfig(f"{FIELD}.checkpoint_format", f"{fmt!r} is not supported")
        return QuantScheme("gptq", _group_size(raw), 1 if fmt == "gptq" else 0)
    if method == "awq":
        _require(raw, "bits", 4)
        _require(raw, "version", "gemm")
        _require(raw, "zero_point", True)
        return QuantScheme("awq", _group_size(raw))
    if method == "compressed-tensors":
        return _compressed_tensors(raw)
    raise InvalidModelConfig(
        f"{FIELD}.quant_method", f"{method!r} is not supported (gptq, awq, compressed-tensors)"
    )


def _require(raw: dict[str, Any], key: str, expected: Any) -> None:
    value = raw.get(key, expected)
    if str(value).lower() != str(expected).lower():
        raise InvalidModelConfig(f"{FIELD}.{key}", f"{value!r} is not supported ({expected!r})")


def _group_size(raw: dict[str, Any]) -> int:
    size = int(raw.get("group_size", 128))
    if size != -1 and (size <= 0 or size % 8):
        raise InvalidModelConfig(f"{FIELD}.group_size", f"{size} is not -1 or a multiple of 8")
    return size


def _compressed_tensors(raw: dict[str, Any]) -> QuantScheme:
    groups = list((raw.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise InvalidModelConfig(f"{FIELD}.config_groups", "exactly one group is supported")
    weights = groups[0].get("weights") or {}
    kind = (weights.get("type"), int(weights.get("num_bits", 0)))
    method = {("int", 8): "int8", ("float", 8): "fp8"}.get(kind)
    if method is None:
        raise InvalidModelConfig(
            f"{FIELD}.config_groups.weights", f"{kind} is not supported (int 8 or float 8)"
        )
    strategy = weights.get("strategy", "channel")
    if strategy not in ("channel", "tensor") or not weights.get("symmetric", True):
        raise InvalidModelConfig(
            f"{FIELD}.config_groups.weights",
            f"strategy {strategy!r} (symmetric {weights.get('symmetric')}) is not supported; "
            "symmetric 'channel' or 'tensor' scales are",
        )
    expected_format = {"int8": "naive-quantized", "fp8": "float-quantized"}[method]
    if raw.get("format", expected_format) != expected_format:
        raise InvalidModelConfig(
            f"{FIELD}.format", f"{raw.get('format')!r} is not supported ({expected_format!r})"
        )
    return QuantScheme(method)
