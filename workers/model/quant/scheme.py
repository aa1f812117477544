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

The decoder layers' projections are quantized; embeddings and norms stay in the model's dtype.
The LM head stays dense too unless the config says it is quantized (`QuantScheme.lm_head`):
GPTQ `"lm_head": true` (AutoGPTQ / GPTQModel write it; lm_head.qweight/qzeros/scales/g_idx),
AWQ `"lm_head": true` (the key vLLM's AWQ-Marlin config reads; AutoAWQ itself never quantizes
the head), compressed-tensors with the head matched by a target
("Linear" or its name) and not listed in `ignore`. A quantized head with tied embeddings is
refused (`check_head_untied`): the head is then the input embedding, which stays a dense table;
vLLM skips a tied checkpoint's lm_head.* tensors, so a quantized copy of it is never served.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import InvalidModelConfig

METHODS = ("gptq", "awq", "int8", "fp8")
FIELD = "quantization_config"
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class QuantScheme:
    method: str
    """One of METHODS."""
    group_size: int = 0
    """Input rows per scale group (4-bit methods); -1 in a checkpoint means one group."""
    zero_offset: int = 0
    """Added to a stored GPTQ zero point: 1 for the original ('gptq') checkpoint format,
    which stores zero - 1, 0 for 'gptq_v2'."""
    lm_head: bool = False
    """The LM head (lm_head.*) is stored quantized in this format too."""

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
    config = json.loads(file.read_text())
    raw = config.get(FIELD)
    if raw is None:
        return None
    scheme = parse_scheme(raw)
    check_head_untied(config, scheme.lm_head)
    return scheme


def check_head_untied(config: dict[str, Any], lm_head: bool) -> None:
    """Refuses a quantized LM head on a model whose head is tied to its input embedding."""
    if lm_head and config.get("tie_word_embeddings", False):
        raise InvalidModelConfig(
            f"{FIELD}.{LM_HEAD}",
            "a quantized LM head with tie_word_embeddings is not supported: the tied head is "
            "the input embedding, which stays a dense table (quantize without the LM head)")


def parse_scheme(raw: dict[str, Any]) -> QuantScheme:
    method = raw.get("quant_method")
    if method == "gptq":
        _require(raw, "bits", 4)
        fmt = raw.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise InvalidModelConfig(f"{FIELD}.checkpoint_format", f"{fmt!r} is not supported")
        return QuantScheme("gptq", _group_size(raw), 1 if fmt == "gptq" else 0,
                           _flag(raw, LM_HEAD))
    if method == "awq":
        _require(raw, "bits", 4)
        _require(raw, "version", "gemm")
        _require(raw, "zero_point", True)
        return QuantScheme("awq", _group_size(raw), lm_head=_flag(raw, LM_HEAD))
    if method == "compressed-tensors":
        return _compressed_tensors(raw)
    raise InvalidModelConfig(
        f"{FIELD}.quant_method", f"{method!r} is not supported (gptq, awq, compressed-tensors)"
    )


def _require(raw: dict[str, Any], key: str, expected: Any) -> None:
    value = raw.get(key, expected)
    if str(value).lower() != str(expected).lower():
        raise InvalidModelConfig(f"{FIELD}.{key}", f"{value!r} is not supported ({expected!r})")


def _flag(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise InvalidModelConfig(f"{FIELD}.{key}", f"{value!r} is not true or false")
    return value


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
    return QuantScheme(method, lm_head=_head_targeted(groups[0].get("targets") or [],
                                                      raw.get("ignore") or []))


def _head_targeted(targets: list[str], ignore: list[str]) -> bool:
    """compressed-tensors' matching for the LM head (an nn.Linear named lm_head): a target is a
    class or module name, an ignore entry a module name, either may be 're:' and a regular
    expression matched against the module name."""

    def matches(pattern: str, names: tuple[str, ...]) -> bool:
        if pattern.startswith("re:"):
            return re.match(pattern[3:], LM_HEAD) is not None
        return pattern in names

    targeted = any(matches(p, ("Linear", LM_HEAD)) for p in targets)
    return targeted and not any(matches(p, (LM_HEAD,)) for p in ignore)
