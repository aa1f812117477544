"""Split-KV paged decode in one launch: the split that arrives last at a (sequence, kv head)
combines every split's partial into the output (kernels/paged_decode.py). Against the
reference at 1, 3 and 8 splits with empty splits (sequences shorter than splits x key tiles),
beside a sequence the kernel skips (more than max_q_len new tokens); with tree masks and an
fp8 cache; the arrival counters are all zero after every launch, and repeated launches agree
bit for bit. On a GPU: the same inside a CUDA graph replayed at other context lengths."""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest
import torch
from paged_case import decode_ref, make_case, poisoned_like, run_decode, with_fp8_cache
from test_paged_decode_tree import ancestor_masks, random_tree
from tolerances import assert_close

from kernels.paged_decode import paged_decode
from kernels.quant_split_k import arrival_counts

# The interpreter's key tiles are 16 long: with 8 splits the 3- and 20-key sequences leave
# 7 and 6 splits empty; the 12-token sequence is prefill's (skipped at max_q_len 8).
Q_LENS, SEQ_LENS = [1, 4, 12, 2, 8], [3, 90, 30, 20, 41]
SKIPPED = slice(5, 17)


def assert_counters_zero(device: str) -> None:
    assert not arrival_counts(torch.device(device), 1).any(), "an arrival counter left non-zero"


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit, NaN (untouched rows) included."""
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("num_kv_heads", [4, 1], ids=["gqa2", "mqa8"])
def test_fused_split_decode_matches_reference(num_splits: int, num_kv_heads: int,
                                              device: str) -> None:
    c = make_case(Q_LENS, SEQ_LENS, num_heads=8, num_kv_heads=num_kv_heads, head_dim=24,
                  block_size=8, dtype=torch.float32, device=device,
                  seed=num_splits * 10 + num_kv_heads)
    out = run_decode(c, 8, num_splits)
    assert_counters_zero(device)
    assert out[SKIPPED].isnan().all(), "rows of a skipped sequence were written"
    ref = decode_ref(c)
    assert_close(out[:SKIPPED.start], ref[:SKIPPED.start])
    assert_close(out[SKIPPED.stop:], ref[SKIPPED.stop:])
    for _ in range(2):
        assert_same_bits(run_decode(c, 8, num_splits), out)
        assert_counters_zero(device)


@pytest.mark.parametrize("num_splits", [3, 8])
def test_fused_split_decode_with_tree_masks_and_fp8_cache(num_splits: int, device: str) -> None:
    """Tree runs of 8 and 4 tokens beside a plain decode; fp8 applies the V scale to every
    partial before the in-launch combine."""
    rng = random.Random(num_splits)
    q_lens, seq_lens = [8, 1, 4], [40, 5, 70]
    masks = ancestor_masks(random_tree(8, rng)) + [0] + ancestor_masks(random_tree(4, rng))
    tree_masks = torch.tensor(masks, dtype=torch.int32, device=device)
    c = make_case(q_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=32, block_size=4,
                  dtype=torch.float32, device=device, seed=30 + num_splits)
    for case in (c, with_fp8_cache(c, k_scale=0.05, v_scale=3.0)):
        out = run_decode(case, 8, num_splits, tree_masks)
        assert_counters_zero(device)
        assert_close(out, decode_ref(case, tree_masks))
        assert_same_bits(run_decode(case, 8, num_splits, tree_masks), out)


def test_split_counts_agree_with_one_split(device: str) -> None:
    """Every split count from 1 to 9 (BLOCK_S 1..16, partly masked) gives one split's output
    to float32 rounding, and leaves the counters at zero."""
    c = make_case([1, 3], [77, 50], num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                  dtype=torch.float32, device=device, seed=4)
    single = run_decode(c, 3, 1)
    for num_splits in range(2, 10):
        assert_close(run_decode(c, 3, num_splits), single)
        assert_counters_zero(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the interpreter does not compile for the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_split_decode_replays_in_a_cuda_graph(dtype: torch.dtype) -> None:
    """Captured once at 8 splits (as the engine's decode graphs are, at max context), replayed
    after the device's seq_lens change: every replay matches the reference and leaves the
    counters zero. Real shapes: 32 heads, 8 kv heads, head dim 128."""
    seq_lens = [3000, 17, 1, 2049]
    c = make_case([1] * 4, seq_lens, num_heads=32, num_kv_heads=8, head_dim=128,
                  block_size=16, dtype=dtype, device="cuda", seed=7)
    out = poisoned_like(c.q)
    seq_lens_dev = c.seq_lens.clone()

    def step() -> None:
        paged_decode(c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_q, seq_lens_dev,
                     max(seq_lens), c.scale, out=out, num_splits=8)

    step()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    for shorter in ([3000, 17, 1, 2049], [1500, 9, 1, 2000], [16, 1, 1, 1]):
        seq_lens_dev.copy_(torch.tensor(shorter, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_counters_zero("cuda")
        assert_close(out, decode_ref(replace(c, seq_lens=seq_lens_dev, seq_lens_host=shorter)))
