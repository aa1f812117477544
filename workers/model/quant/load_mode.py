"""`--quantization`: what loading does with a checkpoint's linear weights (vLLM's flag).

    auto  (default) a checkpoint with a quantization_config (GPTQ, AWQ, compressed-tensors
          INT8/FP8) loads kept quantized in its format; a GGUF file's Q4_0/Q4_1 projections
          stay 4-bit on CUDA (vLLM's behaviour: a .gguf model implies `gguf`) and are
          dequantized to --dtype on the CPU, where no kernel reads the 4-bit layout and it
          would be dequantized again at every step; anything else loads as stored.
    gguf  a GGUF file's Q4_0/Q4_1 projections stay 4-bit on any device (W4A16).
    none  a GGUF file is dequantized to --dtype at load on any device.
    fp8 / int8
          an unquantized checkpoint (bf16/fp16/fp32 folder, or an F32/F16/BF16 GGUF file) has
          its projections quantized while loading, one scale per output channel (vLLM's
          dynamic FP8; round-to-nearest, exactly what `kvrelay quantize --format fp8|int8`
          writes, so both give the same weights). A checkpoint already quantized in the same
          format loads as it is; in another format it is refused, naming the field.

`check_load_mode` runs in the CLI before anything starts; loading resolves the same mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.errors import InvalidModelConfig, InvalidParameter
from workers.model.gguf_file import GGUFFile, is_gguf
from workers.model.quant.scheme import FIELD, QuantScheme, read_scheme

QUANTIZATION_CHOICES = ("auto", "gguf", "none", "fp8", "int8")
QUANTIZATION_HELP = (
    "auto (default): a quantized checkpoint (GPTQ, AWQ, compressed-tensors) stays quantized; a "
    ".gguf file's Q4_0/Q4_1 weights stay 4-bit on CUDA, dequantized to --dtype on the CPU. "
    "gguf / none: a .gguf file kept 4-bit / dequantized on any device. fp8 / int8: an "
    "unquantized checkpoint's linear weights quantized per output channel while loading")
UNQUANTIZED_GGUF_FORMATS = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class LoadMode:
    keep_gguf: bool = False
    """A GGUF file's Q4_0/Q4_1 projections stay 4-bit."""
    at_load: QuantScheme | None = None
    """Quantize the dense projections in this scheme while loading."""


def resolve_load_mode(model: str | Path, quantization: str, device_type: str) -> LoadMode:
    """The mode `quantization` gives checkpoint `model` (folder, config.json or GGUF file) on
    a device of `device_type` ('cuda', 'cpu'). Raises InvalidParameter for an unknown value or
    `gguf` on a non-GGUF model, InvalidModelConfig naming the field (quantization_config, or
    a GGUF file's first quantized tensor) for a quantized checkpoint asked to be quantized at
    load."""
    if quantization not in QUANTIZATION_CHOICES:
        raise InvalidParameter("quantization",
                               f"{quantization!r} is not one of {list(QUANTIZATION_CHOICES)}")
    gguf = is_gguf(model)
    if quantization == "auto":
        return LoadMode(keep_gguf=gguf and device_type == "cuda")
    if quantization in ("gguf", "none"):
        if not gguf:
            raise InvalidParameter("quantization", f"{quantization!r} is for a .gguf model; "
                                   f"{model} is not one (use auto, fp8 or int8)")
        return LoadMode(keep_gguf=quantization == "gguf")
    if gguf:
        quantized = [(name, info.format) for name, info in GGUFFile(model).tensors.items()
                     if info.format not in UNQUANTIZED_GGUF_FORMATS]
        if quantized:
            name, fmt = quantized[0]
            raise InvalidModelConfig(
                name, f"{model} is already quantized ({fmt}); --quantization {quantization} "
                      "needs F32/F16/BF16 weights (use auto, gguf or none)")
        return LoadMode(at_load=QuantScheme(quantization))
    stored = read_scheme(model)
    if stored is None:
        return LoadMode(at_load=QuantScheme(quantization))
    if stored.method != quantization:
        raise InvalidModelConfig(
            FIELD, f"{model} is already quantized ({stored.label}); --quantization "
                   f"{quantization} quantizes an unquantized checkpoint (use auto)")
    return LoadMode()


def check_load_mode(model: str | Path, quantization: str) -> None:
    """The start-up check of `--quantization` against `--model` (device-independent), and of
    the checkpoint's own quantization_config (a method kvrelay does not serve, a quantized LM
    head with tied embeddings), so these fail before any worker starts."""
    resolve_load_mode(model, quantization, "cpu")
    read_scheme(model)


def dummy_scheme(config_path: str | Path, quantization: str) -> QuantScheme | None:
    """The scheme random weights are written in: the config.json's own quantization_config,
    or `--quantization fp8|int8` on an unquantized one."""
    return resolve_load_mode(config_path, quantization, "cpu").at_load or read_scheme(config_path)
