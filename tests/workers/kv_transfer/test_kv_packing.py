"""Pack/unpack of KV blocks is bit-exact, for whole slices and for TP head slices."""

from __future__ import annotations

import random

import pytest
import torch

from workers.kv_transfer import plan_transfer, slice_for_rank
from workers.kv_transfer.packing import (
    as_bytes,
    copy_path,
    pack,
    packed_shape,
    unpack,
)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pack_then_unpack_moves_shuffled_blocks_bit_exactly(layout, dtype, make_caches):
    layout = type(layout)(**{**layout.to_dict(), "dtype": dtype})
    src, dst = make_caches(layout, 12, seed=1), make_caches(layout, 12, seed=2)
    before = [(k.clone(), v.clone()) for k, v in dst]
    rng = random.Random(0)
    src_ids, dst_ids = rng.sample(range(12), 5), rng.sample(range(12), 5)
    plan = plan_transfer(layout, layout)
    buf = pack(src, layout, plan, src_ids)
    assert buf.shape == packed_shape(layout, plan, 5) and buf.is_contiguous()
    # Through the wire format (bytes) and back.
    unpack(as_bytes(buf).clone(), dst, layout, plan, dst_ids)
    untouched = [i for i in range(12) if i not in dst_ids]
    for (sk, sv), (dk, dv), (bk, bv) in zip(src, dst, before, strict=True):
        assert torch.equal(dk[dst_ids].view(torch.uint8), sk[src_ids].view(torch.uint8))
        assert torch.equal(dv[dst_ids].view(torch.uint8), sv[src_ids].view(torch.uint8))
        assert torch.equal(dk[untouched], bk[untouched]) and torch.equal(dv[untouched],
                                                                         bv[untouched])


def test_two_tp_halves_fill_a_tp1_cache(layout, make_caches):
    whole = slice_for_rank(layout, 0, 1)
    reference = make_caches(whole, 6, seed=3)
    halves = [slice_for_rank(layout, r, 2) for r in range(2)]
    # Each prefill TP rank holds its heads of the same KV.
    half_caches = [[(k[:, :, h.kv_head_start:h.kv_head_end].clone(),
                     v[:, :, h.kv_head_start:h.kv_head_end].clone()) for k, v in reference]
                   for h in halves]
    dst = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in reference]
    for half, caches in zip(halves, half_caches, strict=True):
        plan = plan_transfer(half, whole)
        unpack(pack(caches, half, plan, [4, 0]), dst, whole, plan, [1, 2])
    for (rk, rv), (dk, dv) in zip(reference, dst, strict=True):
        assert torch.equal(dk[[1, 2]], rk[[4, 0]]) and torch.equal(dv[[1, 2]], rv[[4, 0]])


def test_tp1_cache_splits_into_tp2_halves(layout, make_caches):
    whole = slice_for_rank(layout, 0, 1)
    src = make_caches(whole, 5, seed=4)
    for rank in range(2):
        half = slice_for_rank(layout, rank, 2)
        dst = make_caches(half, 5, seed=5)
        plan = plan_transfer(whole, half)
        unpack(pack(src, whole, plan, [3]), dst, half, plan, [0])
        heads = slice(half.kv_head_start, half.kv_head_end)
        for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
            assert torch.equal(dk[0], sk[3, :, heads]) and torch.equal(dv[0], sv[3, :, heads])


def test_pack_refuses_caches_that_do_not_match_the_layout(layout, make_caches):
    caches = make_caches(layout, 4, seed=6)[:2]
    with pytest.raises(ValueError, match="caches for layout layers"):
        pack(caches, layout, plan_transfer(layout, layout), [0])


def test_cpu_caches_take_the_torch_path_and_block_ids_may_be_any_int_sequence(layout,
                                                                               make_caches):
    src = make_caches(layout, 6, seed=9)
    assert copy_path(src).startswith("torch index_select")
    plan = plan_transfer(layout, layout)
    from_list = pack(src, layout, plan, [4, 1])
    assert torch.equal(pack(src, layout, plan, (4, 1)), from_list)
    assert torch.equal(pack(src, layout, plan, range(4, 0, -3)), from_list)
