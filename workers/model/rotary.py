"""Rotary position embedding (the "rotate half" layout of HF Llama), with Llama-3 and
linear frequency scaling. The torch path computes cos/sin per step from the packed positions;
the fused path (workers/model/ops.py) reads a cache of max_model_len rows built once."""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.model.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, scaled as transformers does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D], k [N, Hk, D] rotated by cos/sin [N, D] (from RotaryEmbedding)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """Computes cos/sin once per step; every layer applies them with `apply_rotary`."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None):
        super().__init__()
        # A buffer (not a parameter): follows .to(device), never loaded from a checkpoint.
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] in `dtype` for positions [N] (float32 math, as HF)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def cos_sin_cache(self, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos, sin [max_positions, head_dim // 2] (one half: both halves of the
        rotate-half layout share them), for the in-place kernel (kernels/rotary.py)."""
        positions = torch.arange(max_positions, device=self.inv_freq.device).float()
        freqs = positions[:, None] * self.inv_freq.float()[None, :]
        return freqs.cos().contiguous(), freqs.sin().contiguous()
