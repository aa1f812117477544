"""Loading a quantized checkpoint's projections into the model's linear layers, kept
quantized: each q/k/v/o/gate/up/down projection's tensors are read in its format
(workers/model/quant/gptq.py, awq.py, compressed.py), converted to the device layout on the
CPU, cut to this rank's TP shard and handed to the layer (`load_quantized`). Everything else
(embeddings, norms, biases, LM head) loads as in an unquantized checkpoint.

Called by workers/model/weights.py when config.json has a quantization_config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.model.linear import ColumnParallelLinear, RowParallelLinear
from workers.model.llama import CheckpointSlot
from workers.model.quant.awq import read_awq
from workers.model.quant.checkpoint_tensors import ProjectionTensors
from workers.model.quant.compressed import read_channelwise
from workers.model.quant.gptq import read_gptq
from workers.model.quant.scheme import QuantScheme

TensorReader = Callable[[str], "torch.Tensor | None"]
"""Checkpoint tensor name -> the tensor, or None when the checkpoint lacks it."""


@dataclass(frozen=True)
class CheckpointFormat:
    suffixes: tuple[str, ...]
    """The tensors of one projection, `{prefix}.{suffix}` (a reader says which it needs)."""
    read: Callable[[ProjectionTensors], torch.nn.Module]


FORMATS = {
    "gptq": CheckpointFormat(("qweight", "qzeros", "scales", "g_idx"), read_gptq),
    "awq": CheckpointFormat(("qweight", "qzeros", "scales"), read_awq),
    "int8": CheckpointFormat(("weight", "weight_scale"), read_channelwise),
    "fp8": CheckpointFormat(("weight", "weight_scale"), read_channelwise),
}


def is_quantized_slot(slot: CheckpointSlot) -> bool:
    """The slots a quantized checkpoint stores quantized: the projections' weights."""
    linear = (ColumnParallelLinear, RowParallelLinear)
    return isinstance(slot.module, linear) and slot.param_name == "weight"


def load_quantized(
    slots: dict[str, CheckpointSlot], scheme: QuantScheme, read: TensorReader
) -> dict[str, CheckpointSlot]:
    """Loads every projection weight among `slots` from the checkpoint, quantized; returns the
    other slots, for the caller to load as plain tensors."""
    fmt = FORMATS[scheme.method]
    rest = {}
    for name, slot in slots.items():
        if not is_quantized_slot(slot):
            rest[name] = slot
            continue
        prefix = name.removesuffix(".weight")
        tensors = {s: t for s in fmt.suffixes if (t := read(f"{prefix}.{s}")) is not None}
        out_features, in_features = slot.full_shape
        weight = fmt.read(ProjectionTensors(prefix, tensors, scheme, in_features, out_features))
        slot.module.load_quantized(slot.shard, weight)
    return rest
