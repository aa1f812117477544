"""Loading a quantized checkpoint's projections into the model's linear layers, kept
quantized: each q/k/v/o/gate/up/down projection's tensors are read in its format
(workers/model/quant/gptq.py, awq.py, compressed.py), converted to the device layout on the
CPU, cut to this rank's TP shard and handed to the layer (`load_quantized`); so is the LM head
when the scheme quantizes it (`QuantScheme.lm_head`: lm_head.qweight/..., lm_head.weight +
weight_scale). Everything else (embeddings, norms, biases, a dense LM head) loads as in an
unquantized checkpoint.

Called by workers/model/weights.py when config.json has a quantization_config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from workers.model.gguf_file import GGUFFile
from workers.model.linear import ColumnParallelLinear, ParallelLMHead, RowParallelLinear
from workers.model.llama import CheckpointSlot
from workers.model.quant.checkpoint_tensors import ProjectionTensors
from workers.model.quant.formats import FORMATS
from workers.model.quant.gguf_q4 import is_kept_quantized, read_gguf_q4
from workers.model.quant.scheme import QuantScheme

HEAD_WEIGHT = "lm_head.weight"
"""An untied LM head's checkpoint name (a tied one loads from model.embed_tokens.weight)."""
TensorReader = Callable[[str], "torch.Tensor | None"]
"""Checkpoint tensor name -> the tensor, or None when the checkpoint lacks it."""
DenseSource = Callable[[str, tuple[int, ...]], torch.Tensor]
"""(HF weight name, full shape) -> the float weight to quantize, on the device to quantize on
(the checkpoint's tensor, or a dummy weight)."""


def is_quantized_slot(slot: CheckpointSlot, lm_head: bool = False) -> bool:
    """The slots a quantized checkpoint stores quantized: the projections' weights, and the
    LM head's if `lm_head`."""
    if slot.param_name != "weight":
        return False
    if isinstance(slot.module, ParallelLMHead):
        return lm_head
    return isinstance(slot.module, (ColumnParallelLinear, RowParallelLinear))


def load_quantized(
    slots: dict[str, CheckpointSlot], scheme: QuantScheme, read: TensorReader
) -> dict[str, CheckpointSlot]:
    """Loads every projection weight (and the LM head, if the scheme quantizes it) among
    `slots` from the checkpoint, quantized; returns the other slots, for the caller to load as
    plain tensors."""
    suffixes = FORMATS[scheme.method].suffixes

    def stored(prefix: str, slot: CheckpointSlot) -> dict[str, torch.Tensor]:
        return {s: t for s in suffixes if (t := read(f"{prefix}.{s}")) is not None}

    return _load_projections(slots, scheme, stored)


def quantize_projections(
    slots: dict[str, CheckpointSlot], scheme: QuantScheme, dense: DenseSource
) -> dict[str, CheckpointSlot]:
    """As load_quantized, for a checkpoint quantized on the spot: each projection's dense
    weight from `dense`, written in the scheme's format by round-to-nearest (no act-order),
    exactly as `kvrelay quantize` writes it, then read back. Serves `--quantization fp8|int8`
    on an unquantized checkpoint, and dummy weights at real shapes (benchmarks)."""
    write = FORMATS[scheme.method].write

    def made_up(prefix: str, slot: CheckpointSlot) -> dict[str, torch.Tensor]:
        weight = dense(f"{prefix}.weight", slot.full_shape).float()
        return write(weight, scheme.group_size, None)

    return _load_projections(slots, scheme, made_up)


def _load_projections(
    slots: dict[str, CheckpointSlot],
    scheme: QuantScheme,
    tensors_of: Callable[[str, CheckpointSlot], dict[str, torch.Tensor]],
) -> dict[str, CheckpointSlot]:
    read = FORMATS[scheme.method].read
    rest = {}
    for name, slot in slots.items():
        if not is_quantized_slot(slot, scheme.lm_head):
            rest[name] = slot
            continue
        prefix = name.removesuffix(".weight")
        out_features, in_features = slot.full_shape
        tensors = tensors_of(prefix, slot)
        weight = read(ProjectionTensors(prefix, tensors, scheme, in_features, out_features))
        slot.module.load_quantized(slot.shard, weight)
    release_dense_memory()
    return rest


def release_dense_memory() -> None:
    """Hands the freed dense weights back to the device, so the KV cache sizing that follows
    (free memory after load) sees them; the caching allocator would keep them otherwise."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_gguf_q4(slots: dict[str, CheckpointSlot], gguf: GGUFFile) -> dict[str, CheckpointSlot]:
    """Loads, kept 4-bit, the projections of a GGUF file whose every merged part is stored
    Q4_0 / Q4_1 (a layer with one part in another format, say Q6_K, stays dense), and an
    untied LM head (output.weight) stored so, as vLLM keeps a GGUF head in its file's format;
    returns the other slots. The token embedding stays a dense table, tied head included."""
    by_module: dict[int, list[str]] = {}
    for name, slot in slots.items():
        if is_quantized_slot(slot, lm_head=name == HEAD_WEIGHT):
            by_module.setdefault(id(slot.module), []).append(name)
    kept = {name for names in by_module.values()
            if all(is_kept_quantized(gguf, name) for name in names) for name in names}
    for name in kept:
        slots[name].module.load_quantized(slots[name].shard, read_gguf_q4(gguf, name))
    release_dense_memory()
    return {name: slot for name, slot in slots.items() if name not in kept}
