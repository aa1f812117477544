"""Pack/unpack of KV blocks for transfer is pure data movement: bit-exact, and unpacking
touches only the destination blocks and heads. On CPU the kernel runs in the Triton
interpreter; the GPU test checks the Llama-3-8B KV shape and prints bandwidth against a copy."""

from __future__ import annotations

import random
import time

import pytest
import torch

from kernels.kv_pack import (
    pack_kv_blocks,
    pack_kv_blocks_ref,
    packed_shape,
    unpack_kv_blocks,
    unpack_kv_blocks_ref,
)


def _caches(num_layers: int, gen: torch.Generator, device: str, shape=(8, 4, 4, 8),
            dtype=torch.float32):
    return [tuple(torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                  for _ in range(2)) for _ in range(num_layers)]


def _assert_round_trip(src, dst, src_ids, dst_ids, heads) -> None:
    """pack(src) equals the reference; unpacking it into dst equals the reference unpack,
    which also proves every other block and head of dst is untouched."""
    buf = pack_kv_blocks(src, src_ids, heads)
    lo, hi = heads or (0, src[0][0].shape[2])
    assert buf.shape == packed_shape(src, src_ids.numel(), (lo, hi)) and buf.is_contiguous()
    assert torch.equal(buf, pack_kv_blocks_ref(src, src_ids, heads))
    dst_ref = [(k.clone(), v.clone()) for k, v in dst]
    unpack_kv_blocks(buf, dst, dst_ids, heads)
    unpack_kv_blocks_ref(buf, dst_ref, dst_ids, heads)
    for (k, v), (k_ref, v_ref) in zip(dst, dst_ref, strict=True):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    last = len(src) - 1
    assert torch.equal(dst[last][1][dst_ids[-1].item(), :, lo:hi],
                       src[last][1][src_ids[-1].item(), :, lo:hi])


@pytest.mark.parametrize("heads", [None, (1, 3), (0, 3), (3, 4)],
                         ids=["all_heads", "tp_slice", "three_heads", "last_head"])
def test_pack_then_unpack_into_other_blocks_is_exact(heads, device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    src = _caches(3, gen, device)
    selected = [src[0], src[2]]  # a pipeline stage's layers
    block_ids = torch.tensor([5, 1, 6], dtype=torch.int32, device=device)
    dest_ids = torch.tensor([0, 7, 2], dtype=torch.int64, device=device)
    _assert_round_trip(selected, _caches(2, gen, device), block_ids, dest_ids, heads)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads", [None, (2, 4)], ids=["all_heads", "tp_half"])
def test_shuffled_blocks_with_multi_tile_rows_are_exact(dtype, heads, device: str) -> None:
    """Block 16 x 4 heads x d=128 takes several tile steps per block (and 2 heads, fewer;
    fp8 caches, one byte per element, fewer still);
    block ids are a shuffled sample, as a real sequence's blocks are."""
    gen = torch.Generator().manual_seed(5)
    shape = (10, 16, 4, 128)
    rng = random.Random(0)
    src_ids = torch.tensor(rng.sample(range(10), 4), device=device)
    dst_ids = torch.tensor(rng.sample(range(10), 4), device=device)
    _assert_round_trip(_caches(2, gen, device, shape, dtype), _caches(2, gen, device, shape, dtype),
                       src_ids, dst_ids, heads)


def test_block_size_and_row_that_are_not_powers_of_two(device: str) -> None:
    gen = torch.Generator().manual_seed(6)
    shape = (7, 3, 5, 12)  # masked tails in both tile dimensions
    ids = torch.tensor([6, 0, 3], device=device)
    _assert_round_trip(_caches(2, gen, device, shape), _caches(2, gen, device, shape), ids,
                       ids.flip(0), (1, 4))


def test_caches_that_are_views_of_one_allocation_and_new_caches_each_call(device) -> None:
    """A runner may hold all layers in one tensor; caches replaced between calls (new
    addresses) must be read at their new addresses, not through a stale pointer table."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.tensor([4, 2], device=device)
    for _ in range(2):
        whole = torch.randn((3, 2, 6, 4, 4, 8), generator=gen).to(device)
        caches = [(whole[layer, 0], whole[layer, 1]) for layer in range(3)]
        assert torch.equal(pack_kv_blocks(caches, ids), pack_kv_blocks_ref(caches, ids))


def test_pack_into_given_buffer_and_reject_wrong_shape(device: str) -> None:
    gen = torch.Generator().manual_seed(4)
    caches = _caches(1, gen, device)
    ids = torch.tensor([2, 3], dtype=torch.int32, device=device)
    out = torch.full(packed_shape(caches, 2, (0, 4)), float("nan"), device=device)
    assert pack_kv_blocks(caches, ids, out=out) is out
    assert torch.equal(out, pack_kv_blocks_ref(caches, ids))
    with pytest.raises(AssertionError, match="buffer"):
        pack_kv_blocks(caches, ids, out=out[:, :, :1])
    with pytest.raises(AssertionError, match="cache shapes"):
        pack_kv_blocks([(caches[0][0], caches[0][1][:4])], ids)


def _gbps(fn, num_bytes: int, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return num_bytes * iters / (time.perf_counter() - start) / 1e9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llama3_8b_kv_pack_unpack_exact_and_bandwidth_vs_copy() -> None:
    """32 layers x 8 kv heads x d=128, bf16, block 16; 4096 tokens (512 MiB) of shuffled
    blocks, all heads and a TP half. Prints GB/s against a plain copy of the same bytes."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (300, 16, 8, 128)
    src = [tuple(torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)
                 for _ in range(2)) for _ in range(32)]
    dst = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in src]
    rng = random.Random(0)
    src_ids = torch.tensor(rng.sample(range(300), 256), device="cuda")
    dst_ids = torch.tensor(rng.sample(range(300), 256), device="cuda")
    for heads in [None, (4, 8)]:
        _assert_round_trip(src, dst, src_ids, dst_ids, heads)
    buf = pack_kv_blocks(src, src_ids)
    copy = torch.empty_like(buf)
    size = buf.numel() * buf.element_size()
    copy_gbps = _gbps(lambda: copy.copy_(buf), size)
    pack_gbps = _gbps(lambda: pack_kv_blocks(src, src_ids, out=buf), size)
    unpack_gbps = _gbps(lambda: unpack_kv_blocks(buf, dst, dst_ids), size)
    half = pack_kv_blocks(src, src_ids, (4, 8))
    half_gbps = _gbps(lambda: pack_kv_blocks(src, src_ids, (4, 8), out=half), size // 2)
    print(f"\n{torch.cuda.get_device_name()} KV 8B shape, 4096 tokens, {size / 2**20:.0f} MiB: "
          f"copy {copy_gbps:.0f} GB/s | pack {pack_gbps:.0f} ({pack_gbps / copy_gbps:.0%}) | "
          f"unpack {unpack_gbps:.0f} ({unpack_gbps / copy_gbps:.0%}) | pack TP half "
          f"{half_gbps:.0f} ({half_gbps / copy_gbps:.0%})")
