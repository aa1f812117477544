"""`Int4Weight`: a 4-bit weight on the device in the layout kernels/quant_w4a16.py reads, and
its matmul (the Triton kernel on CUDA; dequantize-then-F.linear elsewhere, the reference the
kernel is tested against).

GPTQ and AWQ checkpoints are converted into this layout at load (workers/model/quant/gptq.py,
awq.py). Act-order GPTQ (a g_idx that is not k // group_size) is handled the usual way: the
input rows are sorted by group once at load (`perm`), and each call gathers x's columns in
that order, so the kernel always sees contiguous groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.activation import silu_and_mul_ref
from kernels.norm_handoff import AddNorm, NormedRows, fuses_norm
from kernels.quant_w4a16 import dequantize_w4_ref, takes_norm, w4a16_matmul
from workers.errors import InvalidParameter
from workers.model.quant.packing import pack_int4

SCALE_DTYPE = torch.float16
"""GPTQ and AWQ store float16 scales; kept as stored (no rounding to a bfloat16 model)."""


class Int4Weight(nn.Module):
    """y = x @ W.T for a [N, K] weight W stored as 4-bit values with per-group scales and
    zero points (groups of `group_size` input rows)."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        perm: torch.Tensor | None = None,
        min_form: bool = False,
    ):
        """`min_form`: `zeros` holds each group's minimum m, w = q * scale + m (GGUF Q4_1)."""
        super().__init__()
        self.group_size = group_size
        self.min_form = min_form
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(SCALE_DTYPE).contiguous())
        self.register_buffer("zeros", zeros.to(SCALE_DTYPE).contiguous())
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64))

    @classmethod
    def from_values(
        cls, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
        perm: torch.Tensor | None = None, min_form: bool = False,
    ) -> Int4Weight:
        """From unpacked int values [K, N] (0..15) already in group order."""
        return cls(pack_int4(values, dim=0), scales, zeros, group_size, perm, min_form)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def fuses_activation(self) -> bool:
        """Whether forward(x, gated=True) applies silu(gate) * up inside the matmul (not with
        act-order, whose input permutation would have to run on the activation first)."""
        return self.perm is None

    def takes_norm(self, rows: int) -> bool:
        """Whether forward takes a NormedRows x or `add_norm` for `rows` rows
        (kernels/norm_handoff.py): the matrix-vector kernel on CUDA, no act-order."""
        return self.qweight.is_cuda and self.perm is None and takes_norm(rows, self.group_size)

    def forward(
        self, x: torch.Tensor | NormedRows, gated: bool = False, add_norm: AddNorm | None = None,
    ) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
        """x @ W.T; `gated` (only where `fuses_activation`): x is [..., 2K], an MLP's gate then
        up, and the input is silu(gate) * up. A NormedRows x or `add_norm` only where
        `takes_norm` (x [rows, K])."""
        assert not gated or self.fuses_activation, "act-order weights take no gated input"
        if fuses_norm(x, add_norm):
            assert self.takes_norm(x.shape[0]), f"{x.shape[0]} rows: no norm fusion"
            return w4a16_matmul(x, self.qweight, self.scales, self.zeros, self.group_size,
                                self.min_form, gated=gated, add_norm=add_norm)
        rows = x.reshape(-1, x.shape[-1])
        if x.is_cuda:
            if self.perm is not None:
                rows = rows[:, self.perm]
            out = w4a16_matmul(rows.contiguous(), self.qweight, self.scales, self.zeros,
                               self.group_size, self.min_form, gated=gated)
        else:
            rows = silu_and_mul_ref(rows) if gated else rows
            out = F.linear(rows, self.dequantize().to(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K], input columns in the checkpoint's order."""
        weight = dequantize_w4_ref(self.qweight, self.scales, self.zeros, self.group_size,
                                   self.min_form)
        if self.perm is not None:
            weight = torch.empty_like(weight).index_copy_(0, self.perm, weight)
        return weight.T.contiguous()  # the dense layout: the same CPU matmul kernel, same bits

    def out_slice(self, start: int, length: int) -> Int4Weight:
        """Output columns [start, start + length) (a column-parallel shard)."""
        cols = slice(start, start + length)
        return Int4Weight(self.qweight[:, cols], self.scales[:, cols], self.zeros[:, cols],
                          self.group_size, self.perm, self.min_form)

    def in_slice(self, start: int, length: int) -> Int4Weight:
        """Input rows [start, start + length) (a row-parallel shard): whole groups only, and
        not with act-order (each rank would need the other ranks' inputs)."""
        end = start + length
        if start == 0 and end == self.in_features:
            return self
        aligned = start % self.group_size == 0 and (
            end % self.group_size == 0 or end == self.in_features)
        if self.perm is not None or not aligned:
            raise InvalidParameter(
                "tp_size",
                f"a 4-bit weight with group size {self.group_size}"
                f"{' and act-order' if self.perm is not None else ''} cannot be split at input "
                f"rows {start}..{end} of {self.in_features}",
            )
        groups = slice(start // self.group_size, -(-end // self.group_size))
        return Int4Weight(self.qweight[start // 8 : end // 8], self.scales[groups],
                          self.zeros[groups], self.group_size, None, self.min_form)

    @staticmethod
    def cat_out(parts: list[Int4Weight]) -> Int4Weight:
        """Merged projections (q/k/v, gate/up): the parts side by side along the output."""
        first = parts[0]
        for part in parts[1:]:
            same_perm = (part.perm is None) == (first.perm is None) and (
                part.perm is None or torch.equal(part.perm, first.perm))
            same_form = part.min_form == first.min_form
            if part.group_size != first.group_size or not same_perm or not same_form:
                raise InvalidParameter(
                    "quantization",
                    "merged projections must share group size, act-order and zero-point form",
                )
        return Int4Weight(
            torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
            torch.cat([p.zeros for p in parts], 1), first.group_size, first.perm, first.min_form,
        )
