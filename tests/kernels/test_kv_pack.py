"""Pack/unpack of KV blocks for transfer is pure data movement: bit-exact, and unpacking
touches only the destination blocks."""

from __future__ import annotations

import pytest
import torch

from kernels.kv_pack import (
    pack_kv_blocks,
    pack_kv_blocks_ref,
    packed_shape,
    unpack_kv_blocks,
    unpack_kv_blocks_ref,
)


def _caches(num_layers: int, gen: torch.Generator, device: str, shape=(8, 4, 4, 8)):
    return [(torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen)
             .to(device)) for _ in range(num_layers)]


@pytest.mark.parametrize("heads", [None, (1, 3)], ids=["all_heads", "tp_slice"])
def test_pack_then_unpack_into_other_blocks_is_exact(heads, device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    src = _caches(3, gen, device)
    selected = [src[0], src[2]]  # a pipeline stage's layers
    block_ids = torch.tensor([5, 1, 6], dtype=torch.int32, device=device)
    buf = pack_kv_blocks(selected, block_ids, heads)
    assert buf.shape == packed_shape(selected, 3, heads or (0, 4)) and buf.is_contiguous()
    assert torch.equal(buf, pack_kv_blocks_ref(selected, block_ids, heads))

    dst = _caches(2, gen, device)
    dst_ref = [(k.clone(), v.clone()) for k, v in dst]
    dest_ids = torch.tensor([0, 7, 2], dtype=torch.int64, device=device)
    unpack_kv_blocks(buf, dst, dest_ids, heads)
    unpack_kv_blocks_ref(buf, dst_ref, dest_ids, heads)
    for (k, v), (k_ref, v_ref) in zip(dst, dst_ref, strict=True):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    lo, hi = heads or (0, 4)
    assert torch.equal(dst[1][1][7, :, lo:hi], src[2][1][1, :, lo:hi])


def test_pack_into_given_buffer_and_reject_wrong_shape(device: str) -> None:
    gen = torch.Generator().manual_seed(4)
    caches = _caches(1, gen, device)
    ids = torch.tensor([2, 3], dtype=torch.int32, device=device)
    out = torch.full(packed_shape(caches, 2, (0, 4)), float("nan"), device=device)
    assert pack_kv_blocks(caches, ids, out=out) is out
    assert torch.equal(out, pack_kv_blocks_ref(caches, ids))
    with pytest.raises(AssertionError, match="buffer"):
        pack_kv_blocks(caches, ids, out=out[:, :, :1])
