"""The model's non-matmul ops behind one switch: plain torch, or the fused Triton kernels.

`model_ops(fused, rotary, max_positions)` is called once, when the model is built; layers
call `ops.rms_norm`, `ops.attend` (RoPE, then the attention backend) and `ops.silu_and_mul`
and never branch on the choice.
- `TorchOps` (the reference, any device): Hugging Face Llama's roundings, cos/sin computed
  per step from the positions.
- `FusedOps` (CUDA with the triton attention backend): residual add fused into RMSNorm
  (kernels/rmsnorm.py), RoPE in place from a cos/sin cache built here once, Llama-3 scaling
  included (kernels/rotary.py), SiLU-and-multiply in one pass (kernels/activation.py). With a
  backend that `fuses_rope` (triton), RoPE is handed to the backend's cache write instead:
  one kernel rotates q and writes the rotated k and v (kernels/rotary_cache_write.py).
Both keep the residual stream as a separate tensor: `rms_norm(norm, x, residual)` returns
(norm(x + residual), x + residual), so the fused kernel reads each row once. With FusedOps
a decoder layer may also leave a norm to the quantized projections around it (`fuses_norms`;
workers/model/llama.py DecoderLayer).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from workers.attention.backend import AttentionBackend, AttentionMetadata
from workers.model.rms_norm import RMSNorm
from workers.model.rotary import RotaryEmbedding, apply_rotary

Rope = Any
"""What `ops.rope(positions)` returns and each layer hands to `ops.apply_rope`: (cos, sin)
for TorchOps, the positions themselves for FusedOps."""


FUSED_NORMS_ENV = "KVRELAY_FUSED_NORMS"


class TorchOps:
    """Plain torch; the same roundings as transformers (exact in float32 on any device)."""

    fused = False
    fuses_norms = False
    """Whether a norm between two quantized projections may be finished by them
    (kernels/norm_handoff.py AddNorm) instead of run by `rms_norm`."""

    def __init__(self, rotary: RotaryEmbedding):
        self.rotary = rotary

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        return self.rotary(positions, dtype)

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope: Rope):
        """q [N, Hq, D], k [N, Hk, D] rotated (new tensors here; in place when fused)."""
        return apply_rotary(q, k, *rope)

    def attend(
        self, backend: AttentionBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        rope: Rope, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
        scale: float, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rotate q, k by `rope`, then `backend.forward` (cache write and attention)."""
        q, k = self.apply_rope(q, k, rope)
        return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, scale, k_scale, v_scale)

    def rms_norm(
        self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`: (norm(x + residual), x + residual)."""
        if residual is None:
            return norm(x)
        summed = x + residual
        return norm(summed), summed

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[N, 2I] (gate then up) -> silu(gate) * up [N, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class FusedOps(TorchOps):
    """Triton kernels from kernels/; CUDA only. Holds the float32 cos/sin cache
    [max_positions, head_dim // 2] on the rotary module's device."""

    fused = True

    def __init__(self, rotary: RotaryEmbedding, max_positions: int):
        super().__init__(rotary)
        # KVRELAY_FUSED_NORMS=0 runs every norm as its own kernel (for A/B timing).
        self.fuses_norms = os.environ.get(FUSED_NORMS_ENV, "1") != "0"
        from kernels.activation import silu_and_mul
        from kernels.rmsnorm import rms_norm
        from kernels.rotary import apply_rotary as rotary_in_place

        self._rms_norm, self._silu_and_mul, self._rotary = rms_norm, silu_and_mul, rotary_in_place
        self.cos, self.sin = rotary.cos_sin_cache(max_positions)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        return positions

    def apply_rope(self, q: torch.Tensor, k: torch.Tensor, rope: Rope):
        self._rotary(q, k, rope, self.cos, self.sin)
        return q, k

    def attend(self, backend, q, k, v, rope, kv_cache, meta, scale, k_scale, v_scale):
        if not backend.fuses_rope:
            return super().attend(backend, q, k, v, rope, kv_cache, meta, scale, k_scale,
                                  v_scale)
        return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, scale, k_scale, v_scale,
                               rope=(rope, self.cos, self.sin))

    def rms_norm(self, norm, x, residual=None):
        return self._rms_norm(x, norm.weight, norm.eps, residual)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(gate_up)


def model_ops(fused: bool, rotary: RotaryEmbedding, max_positions: int) -> TorchOps:
    """The one place the choice is made (see module doc)."""
    return FusedOps(rotary, max_positions) if fused else TorchOps(rotary)
