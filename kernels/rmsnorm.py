"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

    h = x + residual            (rounded to x's dtype: the new residual stream)
    out = weight * (h * rsqrt(mean(h^2) + eps))

Statistics in float32; roundings follow Hugging Face Llama's LlamaRMSNorm, so float32 outputs
match it to within float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr,
    stride_x, stride_r, stride_ro, stride_o,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (h * rstd).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(x.dtype), mask=mask)


def _check(x, weight, residual) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"x {tuple(x.shape)} stride {x.stride()}"
    assert weight.shape == (x.shape[1],), f"weight {tuple(weight.shape)} vs hidden {x.shape[1]}"
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1, (
            f"residual {tuple(residual.shape)} vs x {tuple(x.shape)}")
        assert residual.dtype == x.dtype, f"residual {residual.dtype} vs x {x.dtype}"


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x; with `residual`, of x + residual and returns (normed, x + residual)."""
    _check(x, weight, residual)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    num_tokens, hidden = x.shape
    if num_tokens > 0:
        res_in = residual if residual is not None else x
        _rms_norm_kernel[(num_tokens,)](
            x, res_in, res_out, weight, out,
            x.stride(0), res_in.stride(0), res_out.stride(0), out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
            **pdl.launch(x.device),
        )
    return out if residual is None else (out, res_out)


def rms_norm_ref(x, weight, eps, residual=None):
    """Plain-torch reference of `rms_norm` (Hugging Face Llama's roundings)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (normed.to(x.dtype).float() * weight.float()).to(x.dtype)
    return out if residual is None else (out, x)
