"""GPTQ checkpoints as Hugging Face stores them (AutoGPTQ / GPTQModel, `quant_method: gptq`):

    {prefix}.qweight  int32 [K / 8, N]   input row 8i + j in bits 4j..4j+3 of row i
    {prefix}.qzeros   int32 [G, N / 8]   zero points packed along the output, the same way;
                                         the 'gptq' checkpoint format stores zero - 1
    {prefix}.scales   float16 [G, N]
    {prefix}.g_idx    int32 [K]          group of each input row (optional: k // group_size)
    w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n],  G = ceil(K / group_size)

With act-order (desc_act) g_idx is a permutation of groups: rows are quantized in decreasing
order of importance, group g being the g-th run of group_size of them.
"""

from __future__ import annotations

import torch

from workers.model.quant.checkpoint_tensors import FLOAT_DTYPES, INTEGER_DTYPES, ProjectionTensors
from workers.model.quant.int4_weight import Int4Weight
from workers.model.quant.packing import pack_int4, unpack_int4
from workers.model.quant.rtn import int4_groups


def group_size_of(scheme_group_size: int, in_features: int) -> int:
    """-1 in a checkpoint means one group over all input rows."""
    return in_features if scheme_group_size == -1 else scheme_group_size


def read_gptq(p: ProjectionTensors) -> Int4Weight:
    k, n = p.in_features, p.out_features
    group = group_size_of(p.scheme.group_size, k)
    groups = -(-k // group)
    qweight = p.get("qweight", (torch.int32,), (k // 8, n), f"K / 8 = {k // 8} x N = {n}")
    qzeros = p.get("qzeros", (torch.int32,), (groups, n // 8),
                   f"{groups} groups of {group} input rows x N / 8 = {n // 8}")
    scales = p.get("scales", FLOAT_DTYPES, (groups, n),
                   f"{groups} groups of {group} input rows x N = {n}")
    values = unpack_int4(qweight, 0)
    zeros = unpack_int4(qzeros, 1) + p.scheme.zero_offset
    perm = _act_order_perm(p, group) if "g_idx" in p.tensors else None
    if perm is not None:
        values = values[perm]
    return Int4Weight.from_values(values, scales, zeros.float(), group, perm)


def _act_order_perm(p: ProjectionTensors, group: int) -> torch.Tensor | None:
    """None when g_idx is k // group_size; else the order that makes groups contiguous."""
    k = p.in_features
    g_idx = p.get("g_idx", INTEGER_DTYPES, (k,), f"the group of each of the K = {k} input rows")
    sequential = torch.arange(k, device=g_idx.device) // group
    if torch.equal(g_idx.long(), sequential):
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], sequential):
        raise p.invalid("g_idx", f"every group to hold {group} input rows (group size)",
                        f"group sizes {torch.bincount(g_idx.long()).tolist()[:8]}...")
    return perm


def write_gptq(
    weight: torch.Tensor, group_size: int, importance: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Round-to-nearest, symmetric (zero 8), 'gptq' checkpoint format. weight [N, K] float;
    `importance` [K] (act-order): input rows are grouped in decreasing importance."""
    rows = weight.T
    k = rows.shape[0]
    group = group_size_of(group_size, k)
    sequential = torch.arange(k, device=rows.device)
    order = sequential if importance is None else torch.argsort(
        importance, descending=True, stable=True)
    values, scales, zeros = int4_groups(rows[order], group, symmetric=True)
    g_idx = torch.empty(k, dtype=torch.int32, device=rows.device)
    g_idx[order] = (sequential // group).to(torch.int32)
    in_checkpoint_order = torch.empty_like(values).index_copy_(0, order, values)
    return {
        "qweight": pack_int4(in_checkpoint_order, 0),
        "qzeros": pack_int4(zeros - 1, 1),
        "scales": scales,
        "g_idx": g_idx,
    }
