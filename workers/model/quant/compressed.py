"""INT8 and FP8 weights in llm-compressor's compressed-tensors layout (`naive-quantized` INT8,
`float-quantized` FP8), symmetric, one scale per output channel (or one per tensor):

    {prefix}.weight        int8 / float8_e4m3fn [N, K]
    {prefix}.weight_scale  float [N, 1] (channel) or [1] (tensor)
    W = weight * weight_scale
"""

from __future__ import annotations

import torch

from workers.model.quant.channel_weight import ChannelWeight, Fp8Weight, Int8Weight
from workers.model.quant.checkpoint_tensors import FLOAT_DTYPES, ProjectionTensors
from workers.model.quant.rtn import fp8_channels, int8_channels

WEIGHT_CLASSES: dict[str, type[ChannelWeight]] = {"int8": Int8Weight, "fp8": Fp8Weight}


def read_channelwise(p: ProjectionTensors) -> ChannelWeight:
    cls = WEIGHT_CLASSES[p.scheme.method]
    k, n = p.in_features, p.out_features
    weight = p.get("weight", (cls.storage_dtype,), (n, k), f"N = {n} x K = {k}")
    scale = p.tensors.get("weight_scale")
    shape = (n, 1) if scale is None or scale.numel() != 1 else tuple(scale.shape)
    scale = p.get("weight_scale", FLOAT_DTYPES, shape,
                  f"one scale per output channel (N = {n}) or one per tensor")
    return cls(weight, scale.float().reshape(-1).expand(n))


def write_channelwise(weight: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """Round-to-nearest per output channel; scales in float32."""
    q, scale = int8_channels(weight) if method == "int8" else fp8_channels(weight)
    return {"weight": q, "weight_scale": scale[:, None]}
