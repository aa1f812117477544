"""AWQ checkpoints as Hugging Face stores them (AutoAWQ GEMM, `quant_method: awq`,
`version: gemm`):

    {prefix}.qweight  int32 [K, N / 8]   packed along the output in AWQ's interleaved order
                                         (nibble i holds column AWQ_ORDER[i] of eight)
    {prefix}.qzeros   int32 [G, N / 8]   zero points, packed the same way (stored as is)
    {prefix}.scales   float16 [G, N]
    w[k, n] = (q[k, n] - zero[k // group_size, n]) * scale[k // group_size, n]
"""

from __future__ import annotations

import torch

from workers.model.quant.checkpoint_tensors import FLOAT_DTYPES, ProjectionTensors
from workers.model.quant.gptq import group_size_of
from workers.model.quant.int4_weight import Int4Weight
from workers.model.quant.packing import AWQ_ORDER, pack_int4, unpack_int4
from workers.model.quant.rtn import int4_groups


def read_awq(p: ProjectionTensors) -> Int4Weight:
    k, n = p.in_features, p.out_features
    group = group_size_of(p.scheme.group_size, k)
    groups = -(-k // group)
    qweight = p.get("qweight", (torch.int32,), (k, n // 8), f"K = {k} x N / 8 = {n // 8}")
    qzeros = p.get("qzeros", (torch.int32,), (groups, n // 8),
                   f"{groups} groups of {group} input rows x N / 8 = {n // 8}")
    scales = p.get("scales", FLOAT_DTYPES, (groups, n),
                   f"{groups} groups of {group} input rows x N = {n}")
    values = unpack_int4(qweight, 1, AWQ_ORDER)
    zeros = unpack_int4(qzeros, 1, AWQ_ORDER)
    return Int4Weight.from_values(values, scales, zeros.float(), group)


def write_awq(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Round-to-nearest, asymmetric (AWQ's zero_point), no activation-aware scaling."""
    rows = weight.T
    values, scales, zeros = int4_groups(rows, group_size_of(group_size, rows.shape[0]), False)
    return {
        "qweight": pack_int4(values, 1, AWQ_ORDER),
        "qzeros": pack_int4(zeros, 1, AWQ_ORDER),
        "scales": scales,
    }
