"""`Int8Weight` and `Fp8Weight`: a weight [N, K] stored in 8 bits with one float32 scale per
output channel (W = stored * scales[:, None]), and its matmul: on CUDA the W8A16 Triton kernel
(kernels/quant_w8a16.py) or the FP8 tensor-core matmul (kernels/quant_fp8.py, Hopper and
newer); elsewhere dequantize-then-F.linear.

Note the FP8 path also rounds each row of x to FP8 (the tensor cores need both operands in
FP8), so on the GPU it is not bit-equal to the dequantized weight; the INT8 path is, up to
float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.activation import silu_and_mul_ref
from kernels.norm_handoff import AddNorm, NormedRows, fuses_norm
from kernels.quant_fp8 import FP8, fp8_linear
from kernels.quant_split_k import GEMV_MAX_ROWS
from kernels.quant_w8a16 import w8a16_matmul


class ChannelWeight(nn.Module):
    storage_dtype: torch.dtype

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        assert weight.dtype == self.storage_dtype, f"{weight.dtype} vs {self.storage_dtype}"
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).reshape(-1).contiguous())

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    fuses_activation = False
    """The model applies silu(gate) * up before the down projection: in the matrix-vector
    kernel's prologue (forward(x, gated=True), which kernels/quant_w8a16.py still takes) every
    program recomputes the activation over all of K, which cost more than the activation's own
    launch (Llama-3-8B on an H200, 2026-11-28 13:33 UTC: FP8 decode graph 2.74 ms fused vs 2.60
    ms not; the down projection alone 24.0 vs 18.1 us)."""

    def takes_norm(self, rows: int) -> bool:
        """Whether forward takes a NormedRows x or `add_norm` for `rows` rows
        (kernels/norm_handoff.py): the matrix-vector kernel on CUDA."""
        return (self.weight.is_cuda and self.device_matmul_ok()
                and 0 < rows <= GEMV_MAX_ROWS)

    def forward(
        self, x: torch.Tensor | NormedRows, gated: bool = False, add_norm: AddNorm | None = None,
    ) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
        """x @ W.T; `gated`: x is [..., 2K], an MLP's gate then up, and the input is
        silu(gate) * up. A NormedRows x or `add_norm` only where `takes_norm` (x [rows, K])."""
        if fuses_norm(x, add_norm):
            assert self.takes_norm(x.shape[0]), f"{x.shape[0]} rows: no norm fusion"
            return self.device_matmul(x, gated, add_norm)
        rows = x.reshape(-1, x.shape[-1])
        if x.is_cuda and self.device_matmul_ok():
            out = self.device_matmul(rows.contiguous(), gated)
        else:
            rows = silu_and_mul_ref(rows) if gated else rows
            out = F.linear(rows, self.dequantize().to(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def device_matmul_ok(self) -> bool:
        return True

    def device_matmul(self, rows, gated: bool, add_norm: AddNorm | None = None):
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K]."""
        return self.weight.float() * self.scales[:, None]

    def out_slice(self, start: int, length: int) -> ChannelWeight:
        rows = slice(start, start + length)
        return type(self)(self.weight[rows], self.scales[rows])

    def in_slice(self, start: int, length: int) -> ChannelWeight:
        return type(self)(self.weight[:, start : start + length], self.scales)

    @staticmethod
    def cat_out(parts: list[ChannelWeight]) -> ChannelWeight:
        return type(parts[0])(
            torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts])
        )


class Int8Weight(ChannelWeight):
    storage_dtype = torch.int8

    def device_matmul_ok(self) -> bool:
        # The matrix-vector kernel reads the weight as int32 words (kernels/quant_w8a16.py).
        return self.in_features % 4 == 0

    def device_matmul(self, rows, gated: bool, add_norm: AddNorm | None = None):
        return w8a16_matmul(rows, self.weight, self.scales, gated=gated, add_norm=add_norm)


class Fp8Weight(ChannelWeight):
    storage_dtype = FP8
    _tensor_cores: bool | None = None

    def device_matmul_ok(self) -> bool:
        # FP8 tensor cores from Ada/Hopper (sm_89); the matmul wants K and N multiples of 16.
        if self._tensor_cores is None:
            capable = torch.cuda.get_device_capability(self.weight.device) >= (8, 9)
            shapes_ok = self.in_features % 16 == 0 and self.out_features % 16 == 0
            self._tensor_cores = capable and shapes_ok
        return self._tensor_cores

    def device_matmul(self, rows, gated: bool, add_norm: AddNorm | None = None):
        return fp8_linear(rows, self.weight, self.scales, gated=gated, add_norm=add_norm)
