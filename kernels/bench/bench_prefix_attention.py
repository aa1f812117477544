"""`python -m kernels.bench.bench_prefix_attention`: prefill attention of a short query tail
after a long cached prefix (issue 17's shape: 208 or 24 new tokens after 2048 cached), per
split-KV count of kernels/flash_prefill.py, against torch SDPA in the same run.

Llama-3-8B attention: 32 query / 8 kv heads, head dim 128, bf16, KV pages of 16, the block
table shuffled. Two launch layouts: `eager` (the one sequence) and `graph` (what a prefill
CUDA graph launches: the sequence padded to its 16-token bucket beside a padding row of the
rest, block table max_model_len wide; workers/engine/prefill_graph.py). On CUDA every launch
is captured in a CUDA graph and replayed between CUDA events (as serving runs it: no host
launch gaps; K/V stay L2-resident across replays). SDPA: gathered contiguous K/V, kv heads
repeated, an explicit bottom-right causal boolean mask. `--tiny` runs small fp32 shapes
(under TRITON_INTERPRET=1 on CPU: the smoke test that keeps this script alive).
Prints one table with device, date and versions; max |diff| columns check every split count
against one split and SDPA.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton

from kernels.attention_tile import num_sms
from kernels.flash_prefill import (
    PrefillTiles,
    choose_prefill_splits,
    default_tiles,
    flash_prefill,
)


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    page: int
    context: int
    q_lens: tuple[int, ...]
    bucket: int  # prefill graph token buckets are multiples of this
    max_model_len: int
    dtype: torch.dtype


LLAMA3_8B = Shape(32, 8, 128, 16, 2048, (208, 24), 16, 8192, torch.bfloat16)
TINY = Shape(2, 1, 16, 8, 48, (12,), 16, 128, torch.float32)
SPLITS = (1, 2, 4, 8, None)  # None: flash_prefill's own choice
# --sweep-tiles: candidates beside the default (BLOCK_M x BLOCK_N, warps, stages).
SWEEP_TILES = {"gpu": [PrefillTiles(128, 64, 8, 3), PrefillTiles(64, 64, 4, 3),
                       PrefillTiles(128, 32, 4, 3)],
               "tiny": [PrefillTiles(16, 16, 4, 1)]}


@dataclass(frozen=True)
class Launch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    cu_q: torch.Tensor
    seq_lens: torch.Tensor
    max_q_len: int

    def run(self, out: torch.Tensor, tiles: PrefillTiles, num_splits: int | None) -> None:
        flash_prefill(self.q, self.k_cache, self.v_cache, self.block_tables, self.cu_q,
                      self.seq_lens, self.max_q_len, self.q.shape[2] ** -0.5, out=out,
                      tiles=tiles, num_splits=num_splits)


def make_launch(s: Shape, q_len: int, graph: bool, device: str) -> Launch:
    """One sequence of `context` cached + q_len new tokens in shuffled pages; `graph`: padded
    to its bucket with a padding row that lives in one spare page, tables max_model_len wide."""
    seq_len = s.context + q_len
    pages = triton.cdiv(seq_len, s.page)
    width = triton.cdiv(s.max_model_len, s.page) if graph else pages
    shape = (pages + 1, s.page, s.kv_heads, s.head_dim)
    k_cache = torch.randn(shape, device=device).to(s.dtype)
    v_cache = torch.randn(shape, device=device).to(s.dtype)
    tables = torch.full((2 if graph else 1, width), pages, dtype=torch.int32, device=device)
    tables[0, :pages] = torch.randperm(pages, device=device).to(torch.int32)
    q_rows = triton.cdiv(q_len, s.bucket) * s.bucket if graph else q_len
    pad = q_rows - q_len
    cu_q = [0, q_len, q_rows] if graph else [0, q_len]
    seq_lens = [seq_len, pad] if graph else [seq_len]
    return Launch(torch.randn(q_rows, s.heads, s.head_dim, device=device).to(s.dtype),
                  k_cache, v_cache, tables, torch.tensor(cu_q, dtype=torch.int32, device=device),
                  torch.tensor(seq_lens, dtype=torch.int32, device=device), q_rows)


def sdpa_inputs(launch: Launch, q_len: int) -> tuple[torch.Tensor, ...]:
    """The first sequence as SDPA takes it: [1, heads, tokens, d] with the kv heads repeated,
    and its bottom-right causal mask (query i sees keys <= context + i)."""
    seq_len = int(launch.seq_lens[0])
    heads, kv_heads = launch.q.shape[1], launch.k_cache.shape[2]

    def gather(cache: torch.Tensor) -> torch.Tensor:
        keys = cache[launch.block_tables[0].long()].flatten(0, 1)[:seq_len]
        return keys.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)[None]

    q = launch.q[:q_len].transpose(0, 1)[None]
    keys = torch.arange(seq_len, device=q.device)
    mask = keys[None, :] <= (seq_len - q_len + torch.arange(q_len, device=q.device))[:, None]
    return q, gather(launch.k_cache), gather(launch.v_cache), mask


def time_ms(fn: Callable[[], None], device: str, reps: int) -> float:
    """Milliseconds per call: CUDA-graph replays between CUDA events on a GPU (falling back
    to eager launches if the call cannot be captured); wall time elsewhere."""
    fn()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) * 1e3 / reps
    torch.cuda.synchronize()
    run = fn
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError as err:
        print(f"# not captured, timed eagerly: {str(err).splitlines()[0]}", file=sys.stderr)
    for _ in range(3):
        run()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / reps


def bench_case(s: Shape, q_len: int, graph: bool, device: str, reps: int,
               tiles_list: list[PrefillTiles]) -> list[str]:
    """Table rows of one (q_len, layout): every tile shape x split count, then SDPA; speedups
    against the first tile shape (the default) with one split: today's kernel."""
    launch = make_launch(s, q_len, graph, device)
    q, k, v, mask = sdpa_inputs(launch, q_len)
    sdpa_out = torch.empty_like(q)

    def sdpa() -> None:
        sdpa_out.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    sdpa_ms = time_ms(sdpa, device, reps)
    layout = f"{'graph' if graph else 'eager'} ({launch.seq_lens.shape[0]} rows)"
    rows, base = [], None
    for tiles in tiles_list:
        auto = choose_prefill_splits(triton.cdiv(launch.max_q_len, tiles.block_m),
                                     launch.seq_lens.shape[0], s.heads,
                                     launch.block_tables.shape[1] * s.page,
                                     num_sms(torch.device(device)), tiles.block_n)
        shape = f"{tiles.block_m}x{tiles.block_n} w{tiles.num_warps} s{tiles.num_stages}"
        for splits in SPLITS:
            out = torch.zeros_like(launch.q)
            ms = time_ms(lambda n=splits, o=out, t=tiles: launch.run(o, t, n), device, reps)
            ours = out[:q_len]
            base = (ms, ours) if base is None else base
            name = f"auto ({auto})" if splits is None else str(splits)
            vs_one = (ours.float() - base[1].float()).abs().max().item()
            vs_sdpa = (ours.float() - sdpa_out[0].transpose(0, 1).float()).abs().max().item()
            rows.append(f"| {q_len} | {layout} | {shape} | {name} | {ms * 1e3:.1f} | "
                        f"{base[0] / ms:.2f} | {sdpa_ms / ms:.2f} | {vs_one:.1e} | "
                        f"{vs_sdpa:.1e} |")
    rows.append(f"| {q_len} | {layout} | | SDPA | {sdpa_ms * 1e3:.1f} | {base[0] / sdpa_ms:.2f}"
                " | 1.00 | | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench.bench_prefix_attention")
    parser.add_argument("--tiny", action="store_true", help="small fp32 shapes (CPU smoke)")
    parser.add_argument("--reps", type=int, default=200, help="timed calls per cell")
    parser.add_argument("--context", type=int, help="cached tokens (default 2048; tiny 48)")
    parser.add_argument("--q-lens", type=int, nargs="+", help="new tokens (default 208 24)")
    parser.add_argument("--sweep-tiles", action="store_true",
                        help="also time other tile shapes (SWEEP_TILES) at every split count")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY if args.tiny else LLAMA3_8B
    shape = replace(shape, context=args.context or shape.context,
                    q_lens=tuple(args.q_lens or shape.q_lens))
    assert shape.context + max(shape.q_lens) <= shape.max_model_len, "longer than the graph"
    name = (f"{torch.cuda.get_device_name()} ({num_sms(torch.device(device))} SMs)"
            if device == "cuda" else "cpu (Triton interpreter)")
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# device: {name}  date: {now:%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  "
          f"triton {triton.__version__}")
    print(f"# prefix attention: {shape.context} cached tokens + q new, {shape.heads} q / "
          f"{shape.kv_heads} kv heads, d={shape.head_dim}, {shape.dtype}, pages of "
          f"{shape.page}; us per launch (split-KV + combine); speedups: 1-split us / us, "
          "SDPA us / us; max |diff| vs 1 split and vs SDPA; vs/diff 1 split: the default tiles'")
    tiles_list = [default_tiles(shape.head_dim, torch.device(device))]
    if args.sweep_tiles:
        tiles_list += SWEEP_TILES["tiny" if args.tiny else "gpu"]
    print("| q | layout | tiles | splits | us | vs 1 split | vs SDPA | diff 1 split | diff SDPA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q_len in shape.q_lens:
        for graph in (False, True):
            for row in bench_case(shape, q_len, graph, device, args.reps, tiles_list):
                print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
