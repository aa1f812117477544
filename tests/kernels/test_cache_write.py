"""KV cache write is pure data movement: bit-exact with the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.cache_write import write_kv_cache, write_kv_cache_ref


@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 16), (1, 24)])
def test_cache_write_is_exact_and_skips_padding_slots(num_kv_heads: int, head_dim: int,
                                                      device: str) -> None:
    gen = torch.Generator().manual_seed(num_kv_heads * head_dim)
    num_blocks, block_size, num_tokens = 6, 4, 9
    # k, v as strided views into one fused qkv projection, as the model produces them.
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(device)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1
    slots = slots.to(device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device)
    v_cache = torch.randn(shape, generator=gen).to(device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots)
    write_kv_cache_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    flat = k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[slots[0]], k[0])


def test_cache_write_rejects_dtype_mismatch(device: str) -> None:
    k = torch.zeros(2, 1, 16, device=device)
    cache = torch.zeros(2, 4, 1, 16, dtype=torch.float16, device=device)
    with pytest.raises(AssertionError, match="dtypes"):
        write_kv_cache(k, k, cache, cache.clone(), torch.zeros(2, dtype=torch.int64,
                                                               device=device))
