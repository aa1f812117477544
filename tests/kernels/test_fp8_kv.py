"""FP8 (e4m3) KV cache through the kernels: the cache write quantizes bit-exactly like the torch
reference, and prefill / decode dequantize in the kernel exactly as the reference does (same
fp8 cache, same scales: the fp32 tolerance holds). These run under TRITON_INTERPRET=1 on CPU
(the interpreter loads and stores float8_e4m3fn; its rounding cast is bypassed, see
kernels/kv_quant.py) and compiled on a GPU; test_fp8_kv_gpu_real_shapes runs bf16 queries at
Llama-3-8B shapes on a GPU only.
"""

from __future__ import annotations

import pytest
import torch
from paged_case import (
    decode_ref,
    make_case,
    prefill_ref,
    run_decode,
    run_prefill,
    with_fp8_cache,
)
from tolerances import assert_close

from kernels.cache_write import write_kv_cache, write_kv_cache_ref
from kernels.kv_quant import FP8_DTYPE, FP8_MAX, dequantize_kv, quantize_kv


def _scale(value: float, device: str) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


def test_quantize_round_trip_is_within_half_an_e4m3_step_and_saturates() -> None:
    x = torch.cat([torch.randn(4096) * 20, torch.tensor([1000.0, -1000.0, 0.0, -0.0])])
    scale = _scale(0.5, "cpu")
    back = dequantize_kv(quantize_kv(x, scale), scale)
    inside = (x / scale).abs() <= FP8_MAX
    # 3 mantissa bits: relative error <= 2^-4 for normals; subnormals step 2^-9 * scale.
    err = (back - x).abs()[inside]
    assert (err <= x.abs()[inside] * 2 ** -4 + 2 ** -10 * scale).all()
    assert back[-4:-2].tolist() == [FP8_MAX * 0.5, -FP8_MAX * 0.5]


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.37, 2.5)])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fp8_cache_write_quantizes_bit_exactly(src_dtype, k_scale, v_scale, device) -> None:
    gen = torch.Generator().manual_seed(int(k_scale * 100))
    num_blocks, block_size, heads, head_dim, tokens = 6, 4, 2, 24, 13
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=gen) * 40
    qkv[0, 1, 0, :4] = torch.tensor([1e4, -1e4, 127.9, 1e-4])  # saturation, carry, subnormal
    qkv = qkv.to(src_dtype).to(device)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[5] = -1
    slots = slots.to(device)
    shape = (num_blocks, block_size, heads, head_dim)
    k_cache = torch.zeros(shape, dtype=FP8_DTYPE, device=device)
    v_cache = torch.zeros(shape, dtype=FP8_DTYPE, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ks, vs = _scale(k_scale, device), _scale(v_scale, device)
    write_kv_cache(k, v, k_cache, v_cache, slots, ks, vs)
    write_kv_cache_ref(k, v, k_ref, v_ref, slots, ks, vs)
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    written = k_cache.view(-1, heads, head_dim)[slots[0]]
    assert torch.equal(written.view(torch.uint8), quantize_kv(k[0], ks).view(torch.uint8))


def test_fp8_cache_write_needs_scales(device: str) -> None:
    k = torch.zeros(2, 1, 16, device=device)
    cache = torch.zeros(2, 4, 1, 16, dtype=FP8_DTYPE, device=device)
    with pytest.raises(AssertionError, match="k_scale"):
        write_kv_cache(k, k, cache, cache.clone(), torch.zeros(2, dtype=torch.int64,
                                                               device=device))


@pytest.mark.parametrize("num_kv_heads", [4, 1], ids=["gqa2", "mqa8"])
def test_fp8_prefill_dequantizes_like_the_reference(num_kv_heads: int, device: str) -> None:
    c = make_case([20, 3, 33], [45, 20, 33], num_heads=8, num_kv_heads=num_kv_heads,
                  head_dim=32, block_size=8, dtype=torch.float32, device=device,
                  seed=num_kv_heads)
    c = with_fp8_cache(c, k_scale=0.05, v_scale=0.02)
    assert_close(run_prefill(c), prefill_ref(c))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fp8_decode_dequantizes_like_the_reference(num_splits: int, dtype: torch.dtype,
                                                   device: str) -> None:
    """float16 queries take attention_tile.mma_query's path (float16 operands, as bf16 ones do
    on a GPU: the interpreter cannot run bf16)."""
    c = make_case([1, 3, 1, 8], [23, 37, 1, 20], num_heads=8, num_kv_heads=2, head_dim=40,
                  block_size=8, dtype=dtype, device=device, seed=20 + num_splits)
    c = with_fp8_cache(c, k_scale=0.05, v_scale=3.0)
    assert_close(run_decode(c, 8, num_splits), decode_ref(c))


def test_fp8_attention_stays_near_full_precision_attention(device: str) -> None:
    """What fp8 costs: the same inputs with an fp32 cache give outputs within a few
    percent (e4m3 keeps 3 mantissa bits)."""
    c = make_case([1, 1, 1], [50, 17, 33], num_heads=4, num_kv_heads=2, head_dim=32,
                  block_size=8, dtype=torch.float32, device=device, seed=3)
    exact = decode_ref(c)
    fp8 = run_decode(with_fp8_cache(c, k_scale=1.0, v_scale=1.0), 1, 2)
    torch.testing.assert_close(fp8, exact, atol=0.08, rtol=0.0)
    assert (fp8 - exact).abs().mean() < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("q_lens", [[1] * 16, [2, 4, 8, 1] * 4], ids=["decode", "verify"])
def test_fp8_kv_gpu_real_shapes(q_lens: list[int]) -> None:
    """Llama-3-8B attention shapes (32 q / 8 kv heads, d=128, pages of 16), bf16 queries:
    fp8 decode and prefill against the reference on the same fp8 cache."""
    seq_lens = [1000 + 97 * i for i in range(len(q_lens))]
    c = make_case(q_lens, seq_lens, num_heads=32, num_kv_heads=8, head_dim=128,
                  block_size=16, dtype=torch.bfloat16, device="cuda", seed=len(q_lens))
    c = with_fp8_cache(c, k_scale=0.5, v_scale=0.25)
    assert_close(run_decode(c, max(q_lens), None), decode_ref(c))
    prefill = make_case([700, 300], [1500, 300], num_heads=32, num_kv_heads=8, head_dim=128,
                        block_size=16, dtype=torch.bfloat16, device="cuda", seed=7)
    prefill = with_fp8_cache(prefill, k_scale=0.5, v_scale=0.25)
    assert_close(run_prefill(prefill), prefill_ref(prefill))
