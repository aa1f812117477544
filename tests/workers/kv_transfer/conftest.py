"""Fixtures of the KV-transfer tests: small random KV caches and layouts."""

from __future__ import annotations

import pytest
from kv_peer_process import random_caches

from workers.kv_transfer import KVLayout


@pytest.fixture
def make_caches():
    """make_caches(layout, num_blocks, seed) -> random (K, V) per owned layer."""
    return random_caches


@pytest.fixture
def layout() -> KVLayout:
    return KVLayout("tiny-llama", "bfloat16", block_size=4, num_layers=3, num_kv_heads=4,
                    head_dim=8)
