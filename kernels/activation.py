"""SiLU-and-multiply, the gated MLP activation: out = silu(x[:, :I]) * x[:, I:].

Roundings follow Hugging Face Llama (silu rounded to the input dtype, then the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import pdl

_BLOCK = 1024


@triton.jit
def silu_mul(gate, up):
    """silu(gate) * up in gate's dtype, with the module doc's roundings: also the input
    prologue of the quantized matrix-vector kernels (kernels/quant_split_k.py `load_x`), so
    a fused activation gives the same bits as this kernel's output."""
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return (silu * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, silu_mul(gate, up), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * intermediate] (gate then up) -> [num_tokens, intermediate]."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"x {tuple(x.shape)}: want [T, 2 * I]"
    assert x.stride(1) == 1, f"x stride {x.stride()}: last dim must be contiguous"
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens > 0:
        grid = (num_tokens, triton.cdiv(inter, _BLOCK))
        _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), inter, BLOCK=_BLOCK,
                                   **pdl.launch(x.device))
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference of `silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
