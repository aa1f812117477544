"""RMSNorm, computed exactly as Hugging Face does (float32 statistics, weight in model dtype)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def full_shape(self, param_name: str, shard: int) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def load(self, param_name: str, shard: int, full: torch.Tensor) -> None:
        self.weight.data.copy_(full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
