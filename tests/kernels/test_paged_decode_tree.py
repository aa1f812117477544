"""Tree verification in the paged decode kernel: each query token of a tree run sees the
context and its ancestors only (bitmask per token), vs the plain-torch reference, fp32 under
the interpreter; a mask of 0 is plain causal, and a tree that is a chain equals no mask."""

from __future__ import annotations

import random

import pytest
import torch
from paged_case import decode_ref, make_case, run_decode, with_fp8_cache
from tolerances import assert_close

from kernels.attention_ref import visible_keys


def ancestor_masks(parents: list[int]) -> list[int]:
    """Node 0 is the root (parent -1); bit a of node j's mask: node a is j or its ancestor."""
    masks: list[int] = []
    for j, parent in enumerate(parents):
        masks.append((1 << j) | (masks[parent] if parent >= 0 else 0))
    return masks


def random_tree(q_len: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(j) for j in range(1, q_len)]


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("num_kv_heads", [4, 1], ids=["gqa2", "mqa8"])
def test_tree_masked_decode_matches_reference(num_splits: int, num_kv_heads: int,
                                              device: str) -> None:
    """Tree runs of 8, 5 and 3 tokens beside a chain run (mask 0) and a one-token decode."""
    rng = random.Random(num_splits * 7 + num_kv_heads)
    q_lens, seq_lens = [8, 1, 5, 3, 4], [40, 17, 9, 70, 12]
    trees = [random_tree(8, rng), None, random_tree(5, rng), random_tree(3, rng), None]
    masks = [m for q_len, tree in zip(q_lens, trees, strict=True)
             for m in (ancestor_masks(tree) if tree else [0] * q_len)]
    tree_masks = torch.tensor(masks, dtype=torch.int32, device=device)
    c = make_case(q_lens, seq_lens, num_heads=8, num_kv_heads=num_kv_heads, head_dim=32,
                  block_size=4, dtype=torch.float32, device=device, seed=num_splits)
    ref = decode_ref(c, tree_masks)
    assert_close(run_decode(c, 8, num_splits, tree_masks), ref)
    # The tree really masks: without it the tree runs' rows differ.
    assert not torch.allclose(decode_ref(c)[:8], ref[:8])


def test_chain_tree_and_zero_mask_equal_plain_causal(device: str) -> None:
    c = make_case([6, 2], [30, 11], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                  dtype=torch.float32, device=device, seed=3)
    chain = ancestor_masks([-1, 0, 1, 2, 3, 4]) + ancestor_masks([-1, 0])
    plain = run_decode(c, 8, 2)
    for masks in (chain, [0] * 8):
        tree_masks = torch.tensor(masks, dtype=torch.int32, device=device)
        assert_close(run_decode(c, 8, 2, tree_masks), plain)
        assert_close(decode_ref(c, tree_masks), decode_ref(c))


def test_visible_keys_of_a_tree() -> None:
    """Context visible to all; node 2 (child of 0) sees the root and itself, not node 1."""
    masks = torch.tensor(ancestor_masks([-1, 0, 0, 1]))
    visible = visible_keys(6, 4, masks)
    assert visible.tolist() == [
        [True, True, True, False, False, False],
        [True, True, True, True, False, False],
        [True, True, True, False, True, False],
        [True, True, True, True, False, True],
    ]


def test_tree_masked_decode_over_an_fp8_cache(device: str) -> None:
    """The tree tile dequantizes like the context tiles (head_dim 40: the masked-D path)."""
    rng = random.Random(5)
    q_lens, seq_lens = [7, 1, 4], [30, 9, 21]
    masks = ancestor_masks(random_tree(7, rng)) + [0] + ancestor_masks(random_tree(4, rng))
    tree_masks = torch.tensor(masks, dtype=torch.int32, device=device)
    c = make_case(q_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=40, block_size=8,
                  dtype=torch.float32, device=device, seed=11)
    c = with_fp8_cache(c, k_scale=0.05, v_scale=3.0)
    for num_splits in (1, 3):
        assert_close(run_decode(c, 8, num_splits, tree_masks), decode_ref(c, tree_masks))
