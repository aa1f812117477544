"""The checkpoint formats by method: which tensors a projection has, how they are read into
a device layout and how a float weight is written in them (round-to-nearest)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from workers.model.quant.awq import read_awq, write_awq
from workers.model.quant.checkpoint_tensors import ProjectionTensors
from workers.model.quant.compressed import read_channelwise, write_channelwise
from workers.model.quant.gptq import read_gptq, write_gptq

Writer = Callable[[torch.Tensor, int, "torch.Tensor | None"], dict[str, torch.Tensor]]
"""(weight [N, K] float32, group size, act-order importance [K] or None) -> tensors by
suffix."""


@dataclass(frozen=True)
class CheckpointFormat:
    suffixes: tuple[str, ...]
    """The tensors of one projection, `{prefix}.{suffix}` (a reader says which it needs)."""
    read: Callable[[ProjectionTensors], nn.Module]
    write: Writer


FORMATS = {
    "gptq": CheckpointFormat(("qweight", "qzeros", "scales", "g_idx"), read_gptq, write_gptq),
    "awq": CheckpointFormat(("qweight", "qzeros", "scales"), read_awq,
                            lambda weight, group, _: write_awq(weight, group)),
    "int8": CheckpointFormat(("weight", "weight_scale"), read_channelwise,
                             lambda weight, *_: write_channelwise(weight, "int8")),
    "fp8": CheckpointFormat(("weight", "weight_scale"), read_channelwise,
                            lambda weight, *_: write_channelwise(weight, "fp8")),
}
