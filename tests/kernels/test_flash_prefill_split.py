"""Split-KV flash prefill vs the torch reference: each (query block, head) folds its keys in
num_splits ranges taken from the device's seq_len, and a combine kernel merges them. Forced
split counts on long cached contexts with short query tails, fresh prompts, mixed batches,
more splits than tiles (empty splits), GQA, odd head dims, fp16 and fp8 caches; the automatic
choice matches one split."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch
from paged_case import make_case, prefill_ref, run_prefill, with_fp8_cache
from tolerances import assert_close

from kernels.flash_prefill import (
    PrefillTiles,
    choose_prefill_splits,
    default_tiles,
    flash_prefill,
)

# (q_lens, seq_lens); the interpreter's tiles are 32 queries x 16 keys (kernels/flash_prefill).
CASES = {
    "cached_tail": ([5], [90]),  # 6 key tiles seen by one query block: the shape
    "fresh_prompt": ([37], [37]),  # two query blocks, the diagonal tiles only
    "mixed": ([20, 3, 33, 9], [45, 20, 33, 70]),  # 1-tile rows leave splits empty
}


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
@pytest.mark.parametrize("num_kv_heads", [4, 1], ids=["mha", "gqa4"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_split_prefill_matches_reference(case: str, num_kv_heads: int, num_splits: int,
                                         device: str) -> None:
    q_lens, seq_lens = CASES[case]
    c = make_case(q_lens, seq_lens, num_heads=4, num_kv_heads=num_kv_heads, head_dim=16,
                  block_size=8, dtype=torch.float32, device=device,
                  seed=zlib.crc32(f"{case}/{num_kv_heads}/{num_splits}".encode()))
    assert_close(run_prefill(c, num_splits=num_splits), prefill_ref(c))


def test_more_splits_than_tiles_and_odd_head_dim(device: str) -> None:
    """head_dim 24 (padded to 32 in the scratch) and 8 splits of at most 3 key tiles: most
    splits are empty and must contribute nothing."""
    c = make_case([7, 2, 11], [40, 2, 11], num_heads=2, num_kv_heads=1, head_dim=24,
                  block_size=4, dtype=torch.float32, device=device, seed=24)
    assert_close(run_prefill(c, num_splits=8), prefill_ref(c))


def test_split_prefill_respects_min_q_len(device: str) -> None:
    """Rows the prefill kernel skips stay untouched by the combine too."""
    c = make_case([2, 12], [60, 44], num_heads=2, num_kv_heads=2, head_dim=16,
                  block_size=8, dtype=torch.float32, device=device, seed=9)
    out = run_prefill(c, min_q_len=9, num_splits=3)
    assert out[:2].isnan().all()
    assert_close(out[2:], prefill_ref(c)[2:])


def test_split_prefill_fp16(device: str) -> None:
    c = make_case([6, 17], [75, 17], num_heads=4, num_kv_heads=2, head_dim=32,
                  block_size=8, dtype=torch.float16, device=device, seed=16)
    assert_close(run_prefill(c, num_splits=3), prefill_ref(c))


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_prefill_fp8_cache(num_splits: int, device: str) -> None:
    """The V scale is applied once: to each normalized partial, before the linear combine."""
    c = make_case([4, 20], [70, 33], num_heads=4, num_kv_heads=1, head_dim=32,
                  block_size=8, dtype=torch.float32, device=device, seed=80 + num_splits)
    c = with_fp8_cache(c, k_scale=0.05, v_scale=2.5)
    assert_close(run_prefill(c, num_splits=num_splits), prefill_ref(c))


def test_automatic_split_count_matches_one_split(device: str) -> None:
    """One sequence, two heads: 2 programs on the interpreter's 4 'SMs', so the automatic
    choice splits (4 splits: the block table is 33 pages of 8, 16 tiles of 16 keys)."""
    c = make_case([6], [250], num_heads=2, num_kv_heads=1, head_dim=16, block_size=8,
                  dtype=torch.float32, device=device, seed=5)
    tiles = default_tiles(16, torch.device(device))
    if device == "cpu":
        width = c.block_tables.shape[1] * c.k_cache.shape[1]
        assert choose_prefill_splits(1, 1, 2, width, 4, tiles.block_n) == 4
    auto = run_prefill(c)
    assert_close(auto, run_prefill(c, num_splits=1))
    assert_close(auto, prefill_ref(c))


def test_split_count_fills_the_gpu_only_when_needed() -> None:
    # H100 (132 SMs), Llama-3-8B heads, 64-key tiles: 208 new tokens after 2048 cached.
    assert choose_prefill_splits(2, 1, 32, 2256, 132, 64) == 4  # 256 programs, not 5 x 64
    assert choose_prefill_splits(2, 2, 32, 8192, 132, 64) == 4  # a graph's padding row
    assert choose_prefill_splits(1, 1, 32, 2072, 132, 64) == 8  # 24 tokens: capped at 8
    assert choose_prefill_splits(1, 1, 32, 512, 132, 64) == 2  # >= 4 tiles per split
    assert choose_prefill_splits(1, 1, 32, 200, 132, 64) == 1  # short context
    assert choose_prefill_splits(2, 3, 32, 8192, 132, 64) == 1  # the GPU is already full


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("q_len", [208, 24])
@pytest.mark.parametrize("num_splits", [None, 1, 2, 4, 8])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_split_prefill_gpu_cached_tail(q_len: int, num_splits: int | None, fp8: bool) -> None:
    """The issue's shape at Llama-3-8B heads, bf16 queries: q_len new tokens after 2048
    cached, in a bf16 or an fp8 cache."""
    c = make_case([q_len], [2048 + q_len], num_heads=32, num_kv_heads=8, head_dim=128,
                  block_size=16, dtype=torch.bfloat16, device="cuda", seed=q_len)
    if fp8:
        c = with_fp8_cache(c, k_scale=0.5, v_scale=0.25)
    tiles = PrefillTiles(128, 64, 4, 3)
    assert_close(run_prefill(c, num_splits=num_splits, tiles=tiles), prefill_ref(c))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_split_prefill_gpu_graph_replays_other_contexts() -> None:
    """One launch captured in a CUDA graph with 4 splits, replayed at other context lengths
    (as the prefill graphs do): the split ranges follow the device's seq_lens."""
    c = make_case([208], [2048 + 208], num_heads=32, num_kv_heads=8, head_dim=128,
                  block_size=16, dtype=torch.bfloat16, device="cuda", seed=3)
    out = torch.empty_like(c.q)

    def launch() -> None:
        flash_prefill(c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_q, c.seq_lens,
                      c.max_q_len, c.scale, out=out, num_splits=4)

    launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for context in (2048, 700, 0):
        c.seq_lens.fill_(context + 208)
        out.fill_(float("nan"))
        graph.replay()
        assert_close(out, prefill_ref(replace(c, seq_lens_host=[context + 208])))
