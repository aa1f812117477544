"""Round-to-nearest quantization of a float weight (what `kvrelay quantize` writes). No
calibration data and no error feedback: GPTQ's and AWQ's own algorithms choose better values
for the same layouts; these are correct inputs in those layouts, not replacements for them.

- 4-bit groups, symmetric (AutoGPTQ's quantizer with sym=True): scale = 2 * amax / 15,
  zero = 8, q = clamp(round(w / scale) + 8, 0, 15).
- 4-bit groups, asymmetric (AutoAWQ's pseudo_quantize_tensor): scale = (max - min) / 15,
  zero = clamp(round(-min / scale), 0, 15), q = clamp(round(w / scale) + zero, 0, 15).
- 8-bit per output channel: INT8 scale = amax / 127; FP8 (e4m3) scale = amax / 448.
Scales are rounded to their stored dtype before q is computed, so dequantizing the stored
values reproduces exactly what was rounded.
"""

from __future__ import annotations

import torch

from kernels.kv_quant import divide
from kernels.quant_fp8 import FP8, FP8_MAX
from workers.model.quant.int4_weight import SCALE_DTYPE

INT4_MAX = 15
AWQ_MIN_RANGE = 1e-5
"""AutoAWQ's floor of a group's (max - min)."""
INT8_MAX = 127


def int4_groups(
    weight: torch.Tensor, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [K, N] float (input rows in group order; the last group may be short) ->
    (values int32 [K, N] in 0..15, scales float16 [G, N], zeros int32 [G, N])."""
    k = weight.shape[0]
    values, scales, zeros = [], [], []
    for start in range(0, k, group_size):
        group = weight[start : start + group_size].float()
        if symmetric:
            scale = divide(group.abs().amax(0) * 2, INT4_MAX)
            zero = torch.full_like(scale, 8)
        else:
            low = group.amin(0)
            scale = divide((group.amax(0) - low).clamp(min=AWQ_MIN_RANGE), INT4_MAX)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(SCALE_DTYPE).float()
        if not symmetric:
            zero = (-low / scale).round().clamp(0, INT4_MAX)
        values.append(((group / scale).round() + zero).clamp(0, INT4_MAX))
        scales.append(scale)
        zeros.append(zero)
    return (torch.cat(values).to(torch.int32), torch.stack(scales).to(SCALE_DTYPE),
            torch.stack(zeros).to(torch.int32))


def int8_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K], float32 scales [N])."""
    scale = _channel_scale(weight, INT8_MAX)
    q = (weight.float() / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def fp8_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8_e4m3fn [N, K], float32 scales [N])."""
    scale = _channel_scale(weight, FP8_MAX)
    return (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _channel_scale(weight: torch.Tensor, qmax: float) -> torch.Tensor:
    scale = divide(weight.float().abs().amax(1), qmax)
    return torch.where(scale > 0, scale, torch.ones_like(scale))
