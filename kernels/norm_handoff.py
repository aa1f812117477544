"""The RMSNorm between two matrix-vector matmuls, finished by them instead of a kernel of its
own (a decoder layer's o_proj -> post-attention norm -> gate_up_proj, and down_proj -> the next
layer's input norm -> its qkv_proj; workers/model/llama.py): the producer's epilogue adds the
residual and hands on `NormedRows` (`AddNorm`), the consumer scales its sums by rstd. The
kernels in kernels/quant_w4a16_gemv.py and kernels/quant_w8a16.py take these arguments
(`norm_launch`) and call the jit helpers below."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.quant_split_k import SplitOutput


@dataclass(frozen=True)
class AddNorm:
    """What a matrix-vector matmul's epilogue does for the RMSNorm after it (a decoder layer's
    o and down projections, whose norm is followed by another projection): with y its rounded
    output, h = y + `residual` rounded to y's dtype is the new residual stream, returned in
    y's place, and the next projection gets `NormedRows` of h for the norm of `weight`, `eps`.
    The norm's launch is gone: at batch 1 it was ~2.3 us on the step's critical path per norm
    (two per layer) with PDL (Llama-3-8B layers on an H200, 2026-11-29)."""

    residual: torch.Tensor  # [M, N], the output's dtype
    weight: torch.Tensor  # [N]
    eps: float


@dataclass(frozen=True)
class NormedRows:
    """A matrix-vector matmul's input rms_norm(h) * weight, handed over unfinished by the
    previous matmul's `AddNorm`: `scaled` [M, K] is h * weight rounded to the activations'
    dtype, `square_parts` float32 [M, P] the sums of h^2 over the producer's P column tiles.
    The consumer sums the parts in one fixed order (every program gets the same rstd = 1 /
    sqrt(sum / K + eps)) and scales its float32 sums by rstd before rounding: rstd round(h w)
    @ W, one rounding of the normed input where kernels/rmsnorm.py's round(round(h rstd) w)
    has two (none in float32). `scaled` in the activations' dtype keeps the consumer's loads
    those of a plain input: a float32 one made W4A16's gate/up programs, which each read all
    of x, measurably slower."""

    scaled: torch.Tensor
    square_parts: torch.Tensor
    eps: float
    dtype: torch.dtype
    """The activations' dtype, the consumer's output dtype."""

    @property
    def shape(self) -> torch.Size:
        return self.scaled.shape


def fuses_norm(x, add_norm: AddNorm | None) -> bool:
    """Whether a matmul call takes part in a handoff: a NormedRows input or an `add_norm`."""
    return isinstance(x, NormedRows) or add_norm is not None


def input_rows(x: torch.Tensor | NormedRows) -> torch.Tensor:
    """The tensor a matmul reads as x (a NormedRows' `scaled`), for its shape checks."""
    return x.scaled if isinstance(x, NormedRows) else x


def norm_launch(x: torch.Tensor | NormedRows, add_norm: AddNorm | None, out: SplitOutput,
                n: int) -> tuple[torch.Tensor, dict, NormedRows | None]:
    """(the tensor the kernel loads as x, the kernel arguments of `square_parts`, `rstd`,
    `norm_weight`, `residual_row` and `store_row_add_norm`, the NormedRows the launch hands
    on) for a matrix-vector launch writing `out` ([M, n]). Both need whole rows of the output
    per program: no split."""
    normed = isinstance(x, NormedRows)
    assert not (out.split and (normed or add_norm)), "a split launch cannot finish a norm"
    m = out.out.shape[0]
    args = {"NORMED": normed, "ADD_NORM": add_norm is not None}
    if normed:
        parts = x.square_parts
        args.update(sq_in_ptr=parts, stride_sq_in=parts.stride(0), n_parts=parts.shape[1],
                    eps=x.eps, PARTS=triton.next_power_of_2(parts.shape[1]))
        x = x.scaled
    else:
        args.update(sq_in_ptr=out.out, stride_sq_in=0, n_parts=1, eps=0.0, PARTS=1)
    handed = None
    if add_norm is not None:
        res = add_norm.residual
        assert res.shape == (m, n) and res.stride(1) == 1 and res.dtype == out.out.dtype, (
            f"residual {res.dtype} {tuple(res.shape)} vs output {out.out.dtype} {(m, n)}")
        assert add_norm.weight.shape == (n,), f"norm weight {tuple(add_norm.weight.shape)}"
        scaled = torch.empty((m, n), dtype=out.out.dtype, device=res.device)
        squares = torch.empty((m, out.tiles[1]), dtype=torch.float32, device=res.device)
        handed = NormedRows(scaled, squares, add_norm.eps, out.out.dtype)
        args.update(res_ptr=res, stride_res=res.stride(0), scaled_ptr=scaled,
                    norm_w_ptr=add_norm.weight, sq_out_ptr=squares)
    else:
        args.update(res_ptr=out.out, stride_res=0, scaled_ptr=out.out, norm_w_ptr=out.out,
                    sq_out_ptr=out.out)
    return x, args, handed


@triton.jit
def square_parts(sq_in_ptr, row, stride_sq_in, n_parts, NORMED: tl.constexpr,
                 PARTS: tl.constexpr):
    """Row `row`'s square parts of a NormedRows input (NORMED; else 0). Reads step data: after
    pdl.enter; loaded first, reduced last (`rstd`), so their latency overlaps the loop's."""
    parts = 0.0
    if NORMED:  # a constexpr branch, so `parts` may change type (one return: Triton's rule)
        offs = tl.arange(0, PARTS)
        parts = tl.load(sq_in_ptr + row * stride_sq_in + offs, mask=offs < n_parts, other=0.0)
    return parts


@triton.jit
def rstd(parts, K, eps, NORMED: tl.constexpr):
    """1 / sqrt(mean h^2 + eps) from `square_parts` (NORMED), else 1."""
    scale = 1.0
    if NORMED:
        scale = 1.0 / tl.sqrt(tl.sum(parts, axis=0) / K + eps)
    return scale


@triton.jit
def norm_weight(norm_w_ptr, offs_n, N, ADD_NORM: tl.constexpr):
    """AddNorm's norm weight at columns offs_n (ADD_NORM; else 0): a load-time constant,
    loaded before pdl.enter."""
    weight = 0.0
    if ADD_NORM:
        weight = tl.load(norm_w_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    return weight


@triton.jit
def residual_row(res_ptr, row, stride_res, offs_n, N, ADD_NORM: tl.constexpr):
    """AddNorm's residual at row `row`, columns offs_n (ADD_NORM; else 0), as float32: step
    data, loaded right after pdl.enter so that the epilogue does not wait for it."""
    residual = 0.0
    if ADD_NORM:
        ptrs = res_ptr + row.to(tl.int64) * stride_res + offs_n
        residual = tl.load(ptrs, mask=offs_n < N, other=0.0).to(tl.float32)
    return residual


@triton.jit
def store_row_add_norm(out_ptr, y, row, offs_n, N, stride_om, residual, weight, scaled_ptr,
                       sq_out_ptr):
    """`AddNorm`'s epilogue for columns offs_n (column tile program_id(1)) of output row
    `row`, with `residual_row` and `norm_weight` loaded earlier: h = round(round(y) +
    residual) into out, round(h * weight) into the NormedRows' `scaled`, and sum h^2 over
    these columns into its square part. The rounding is kernels/rmsnorm.py's fused residual
    add, bit for bit."""
    n_ok = offs_n < N
    row = row.to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    h = (y.to(dtype).to(tl.float32) + residual).to(dtype)
    tl.store(out_ptr + row * stride_om + offs_n, h, mask=n_ok)
    hf = h.to(tl.float32)
    tl.store(scaled_ptr + row * N + offs_n, (hf * weight).to(dtype), mask=n_ok)
    tl.store(sq_out_ptr + row * tl.num_programs(1) + tl.program_id(1), tl.sum(hf * hf, axis=0))
