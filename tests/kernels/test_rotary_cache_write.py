"""The fused RoPE + cache write kernel is bit for bit `apply_rotary` then `write_kv_cache`."""

from __future__ import annotations

import pytest
import torch

from kernels.cache_write import write_kv_cache
from kernels.kv_quant import FP8_DTYPE
from kernels.rotary import apply_rotary
from kernels.rotary_cache_write import rotary_cache_write
from workers.model.config import RopeScaling
from workers.model.rotary import RotaryEmbedding


def _case(heads, kv_heads, head_dim, rotary_dim, dtype, cache_dtype, device, tokens=9,
          scale=20.0):
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + rotary_dim)
    block_size = 4
    num_blocks = max(6, -(-tokens // block_size) + 2)
    # q, k, v as strided views into one fused qkv projection, as the model produces them.
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen) * scale
    qkv = qkv.to(dtype).to(device)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    rotary = RotaryEmbedding(rotary_dim, 500000.0, RopeScaling(
        "llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=64))
    cos, sin = (t.to(device) for t in rotary.cos_sin_cache(256))
    positions = torch.randint(0, 256, (tokens,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    if tokens > 3:
        slots[3] = -1  # a padding token: q rotated, nothing written
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.zeros(shape, dtype=cache_dtype, device=device)
    scales = [torch.tensor([s], device=device) for s in (0.37, 2.5)]
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=k_cache.clone(),
                slot_mapping=slots.to(device), positions=positions, cos=cos, sin=sin,
                k_scale=scales[0], v_scale=scales[1])


def _two_kernels(c):
    q, k = c["q"].clone(), c["k"].clone()
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    apply_rotary(q, k, c["positions"], c["cos"], c["sin"])
    write_kv_cache(k, c["v"], k_cache, v_cache, c["slot_mapping"], c["k_scale"], c["v_scale"])
    return q, k_cache, v_cache


def _fused(c):
    q, k, k_cache, v_cache = c["q"].clone(), c["k"].clone(), c["k_cache"].clone(), \
        c["v_cache"].clone()
    rotary_cache_write(q, k, c["v"], k_cache, v_cache, c["slot_mapping"], c["positions"],
                       c["cos"], c["sin"], c["k_scale"], c["v_scale"])
    assert torch.equal(k, c["k"]), "k itself is left unrotated"
    return q, k_cache, v_cache


def assert_same_bits(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [
    (4, 2, 16, 16), (4, 1, 24, 16), (3, 3, 16, 8), (8, 2, 32, 32)],
    ids=["gqa", "partial-mqa", "mha-partial", "gqa4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_equals_two_kernels(heads, kv_heads, head_dim, rotary_dim, dtype, device) -> None:
    c = _case(heads, kv_heads, head_dim, rotary_dim, dtype, dtype, device)
    got, want = _fused(c), _two_kernels(c)
    assert_same_bits(got, want)
    # The padding row: q rotated, nothing written (the caches were zero).
    assert not torch.equal(got[0][3], c["q"][3])
    written = (got[1].flatten(0, 1) != 0).flatten(1).any(-1).sum()
    assert written == len(c["slot_mapping"]) - 1


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(4, 2, 24, 24), (4, 2, 24, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_fp8_cache_equals_two_kernels(heads, kv_heads, head_dim, rotary_dim, dtype,
                                            device) -> None:
    c = _case(heads, kv_heads, head_dim, rotary_dim, dtype, FP8_DTYPE, device, scale=40.0)
    c["v"][0, 0, :4] = torch.tensor([1e4, -1e4, 127.9, 1e-4])  # saturation, carry, subnormal
    assert_same_bits(_fused(c), _two_kernels(c))


def test_fused_writes_nothing_for_padding_slots(device) -> None:
    c = _case(4, 2, 16, 16, torch.float32, torch.float32, device)
    c["slot_mapping"].fill_(-1)
    q, k_cache, v_cache = _fused(c)
    assert not k_cache.any() and not v_cache.any()
    assert torch.equal(q, _two_kernels(c)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_DTYPE], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tokens", [1, 8, 37])
def test_fused_llama3_8b_decode_shapes_gpu(cache_dtype, tokens) -> None:
    """Llama-3-8B: 32 q heads, 8 kv heads, head_dim 128, bf16 activations."""
    c = _case(32, 8, 128, 128, torch.bfloat16, cache_dtype, "cuda", tokens=tokens, scale=4.0)
    assert_same_bits(_fused(c), _two_kernels(c))
