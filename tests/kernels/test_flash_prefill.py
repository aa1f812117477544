"""Paged flash prefill vs the torch reference: ragged chunks with cached prefixes, GQA, odd
head dims, shuffled blocks, NaN-poisoned outputs and caches."""

from __future__ import annotations

import zlib

import pytest
import torch
from paged_case import make_case, prefill_ref, run_prefill
from tolerances import assert_close

from kernels.flash_prefill import PrefillTiles, flash_prefill

# (q_lens, seq_lens): full prompts, chunks after a cached prefix, lengths off the block size.
CASES = {
    "fresh_prompts": ([37, 5, 16], [37, 5, 16]),
    "cached_prefix_chunks": ([20, 3, 33], [45, 20, 33]),
}


@pytest.mark.parametrize("num_kv_heads", [8, 2, 1], ids=["mha", "gqa4", "mqa8"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_matches_reference(case: str, num_kv_heads: int, device: str) -> None:
    q_lens, seq_lens = CASES[case]
    c = make_case(q_lens, seq_lens, num_heads=8, num_kv_heads=num_kv_heads, head_dim=32,
                  block_size=8, dtype=torch.float32, device=device,
                  seed=zlib.crc32(f"{case}/{num_kv_heads}".encode()))
    out = run_prefill(c)
    ref = prefill_ref(c)
    assert_close(out, ref)


@pytest.mark.parametrize("head_dim", [24, 64])
def test_prefill_head_dims_and_tile_shapes(head_dim: int, device: str) -> None:
    """A non-power-of-two head dim (masked feature axis) and tiles wider than a page."""
    c = make_case([19, 7], [26, 7], num_heads=4, num_kv_heads=2, head_dim=head_dim,
                  block_size=4, dtype=torch.float32, device=device, seed=head_dim)
    out = run_prefill(c, tiles=PrefillTiles(16, 16, 4, 1))
    ref = prefill_ref(c)
    assert_close(out, ref)


def test_prefill_skips_sequences_shorter_than_min_q_len(device: str) -> None:
    """min_q_len leaves decode rows to the decode kernel: they stay exactly as they were."""
    c = make_case([2, 12], [30, 12], num_heads=4, num_kv_heads=4, head_dim=16,
                  block_size=8, dtype=torch.float32, device=device, seed=7)
    out = run_prefill(c, min_q_len=9)
    ref = prefill_ref(c)
    assert out[:2].isnan().all()
    assert_close(out[2:], ref[2:])


def test_prefill_rejects_mismatched_shapes(device: str) -> None:
    c = make_case([4], [4], num_heads=6, num_kv_heads=4, head_dim=16, block_size=4,
                  dtype=torch.float32, device=device, seed=1)
    with pytest.raises(AssertionError, match="num_kv_heads"):
        flash_prefill(c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_q, c.seq_lens,
                      c.max_q_len, c.scale)
