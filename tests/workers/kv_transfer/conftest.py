"""Fixtures of the KV-transfer tests: small random KV caches and layouts."""

from __future__ import annotations

import pytest
import torch

from workers.kv_transfer import KVLayout


def random_caches(layout: KVLayout, num_blocks: int, seed: int, device: str = "cpu"):
    """One (K, V) per owned layer, `[num_blocks, block_size, owned kv heads, head_dim]`."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, layout.block_size, len(layout.kv_heads), layout.head_dim)
    dtype = getattr(torch, layout.dtype)
    return [tuple(torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(2))
            for _ in layout.layers]


@pytest.fixture
def make_caches():
    """make_caches(layout, num_blocks, seed) -> random (K, V) per owned layer."""
    return random_caches


@pytest.fixture
def layout() -> KVLayout:
    return KVLayout("tiny-llama", "bfloat16", block_size=4, num_layers=3, num_kv_heads=4,
                    head_dim=8)
