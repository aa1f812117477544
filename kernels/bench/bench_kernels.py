"""`python -m kernels.bench.bench_kernels`: prefill TFLOP/s vs torch SDPA, decode GB/s vs copy,
and decode attention over an fp8 (e4m3) KV cache vs the bf16 one (time per step and ratio).

Shapes follow the Llama-3-8B attention layer: 32 query / 8 kv heads, head dim 128, bf16, KV
block size 16, block tables shuffled. Prefill runs ~16k tokens per launch (batch = 16k / seq).
Decode steps are timed as CUDA-graph replays (triton's do_bench_cudagraph), as the engine runs
them: a plain call's host work (~0.1 ms) would otherwise bound the small shapes. Prints one table
with device, date and versions; `--sweep` also times the tile candidates.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

from kernels.bench.bandwidth import copy_bandwidth
from kernels.flash_prefill import PrefillTiles, default_tiles, flash_prefill
from kernels.kv_quant import FP8_DTYPE, is_fp8
from kernels.paged_decode import DecodeTiles, paged_decode

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
PREFILL_TILES = [PrefillTiles(128, 64, 4, 3), PrefillTiles(128, 64, 4, 4),
                 PrefillTiles(128, 128, 8, 3), PrefillTiles(128, 32, 4, 4),
                 PrefillTiles(64, 64, 4, 4), PrefillTiles(128, 64, 4, 2)]
DECODE_TILES = [DecodeTiles(64, 4, 3), DecodeTiles(128, 4, 3), DecodeTiles(64, 2, 3)]
SPLIT_SHAPES = [(1, 4096), (1, 16384), (16, 1024), (16, 4096), (64, 1024)]


def _paged(num_seqs: int, seq_len: int, device: str, kv_dtype: torch.dtype = DTYPE):
    """Caches with each sequence's blocks at shuffled places, and the block tables."""
    blocks_per_seq = triton.cdiv(seq_len, PAGE)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, PAGE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device=device).to(kv_dtype)
    v_cache = torch.randn(shape, dtype=DTYPE, device=device).to(kv_dtype)
    tables = torch.randperm(num_blocks, device=device).to(torch.int32)
    return k_cache, v_cache, tables.view(num_seqs, blocks_per_seq)


def _sdpa_ms(q, k, v, backend) -> float:
    def run():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True)
    if backend is None:
        return do_bench(run)
    with sdpa_kernel(backend):
        return do_bench(run)


def bench_prefill(seq: int, device: str, tiles: PrefillTiles | None) -> dict[str, float]:
    batch = 16384 // seq
    q = torch.randn(batch * seq, HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    k_cache, v_cache, tables = _paged(batch, seq, device)
    cu_q = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * seq
    seq_lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    scale = HEAD_DIM ** -0.5
    ms = do_bench(lambda: flash_prefill(q, k_cache, v_cache, tables, cu_q, seq_lens, seq, scale,
                                        out=out, tiles=tiles))
    flops = 4 * batch * HEADS * seq * seq * HEAD_DIM / 2  # causal: half the square
    qs = q.view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
    ks = torch.randn(batch, KV_HEADS, seq, HEAD_DIM, dtype=DTYPE, device=device)
    vs = torch.randn_like(ks)
    result = {"ours": flops / ms / 1e9}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_default", None)):
        try:
            result[name] = flops / _sdpa_ms(qs, ks, vs, backend) / 1e9
        except RuntimeError as err:  # a backend that cannot take these inputs
            print(f"# {name} at seq {seq}: {str(err).splitlines()[0]}", file=sys.stderr)
            result[name] = float("nan")
    return result


def decode_ms(batch: int, context: int, device: str, tiles: DecodeTiles | None,
              num_splits: int | None = None, kv_dtype: torch.dtype = DTYPE) -> float:
    """Milliseconds of one decode step (bf16 queries; fp8 caches with scales of 1.0), replayed
    from a CUDA graph."""
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    k_cache, v_cache, tables = _paged(batch, context, device, kv_dtype)
    scale = torch.ones(1, dtype=torch.float32, device=device) if is_fp8(kv_dtype) else None
    cu_q = torch.arange(0, batch + 1, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    out = torch.empty_like(q)

    def step():
        paged_decode(q, k_cache, v_cache, tables, cu_q, seq_lens, context, HEAD_DIM ** -0.5,
                     out=out, tiles=tiles, num_splits=num_splits, k_scale=scale, v_scale=scale)
    # do_bench_cudagraph runs on a stream of its own, which does not wait for the inputs'
    # kernels queued on this one (a block table still being written read out of bounds).
    torch.cuda.synchronize(device)
    return do_bench_cudagraph(step)


def bench_decode(batch: int, context: int, device: str, tiles: DecodeTiles | None,
                 num_splits: int | None = None) -> float:
    """GB/s of K/V bytes read per decode step."""
    ms = decode_ms(batch, context, device, tiles, num_splits)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    return kv_bytes / ms / 1e6


def sweep(device: str) -> None:
    for tiles in PREFILL_TILES:
        try:
            speeds = [bench_prefill(seq, device, tiles)["ours"] for seq in (1024, 4096, 16384)]
            print(f"# sweep prefill {tiles}: 1k/4k/16k " + " / ".join(f"{x:.0f}" for x in speeds))
        except Exception as err:  # noqa: BLE001 - a tile shape that does not fit shared memory
            print(f"# sweep prefill {tiles}: failed {type(err).__name__}")
    for tiles in DECODE_TILES:
        speeds = [bench_decode(b, c, device, tiles) for b, c in SPLIT_SHAPES]
        print(f"# sweep decode {tiles} at {SPLIT_SHAPES}: " + " ".join(f"{x:.0f}" for x in speeds))
    for batch, context in SPLIT_SHAPES:
        speeds = {n: bench_decode(batch, context, device, None, n) for n in (1, 2, 4, 8, 16, 32,
                                                                              64, 128)}
        print(f"# sweep decode splits {batch}x{context}: "
              + " ".join(f"{n}:{x:.0f}" for n, x in speeds.items()))


def _fits(batch: int, context: int) -> bool:
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    return kv_bytes < 0.4 * torch.cuda.get_device_properties(0).total_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench.bench_kernels")
    parser.add_argument("--sweep", action="store_true", help="also time tile candidates")
    args = parser.parse_args(argv)
    device = "cuda"
    props = torch.cuda.get_device_properties(0)
    print(f"# device: {props.name} ({props.multi_processor_count} SMs)  date: "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  torch "
          f"{torch.__version__}  triton {triton.__version__}")
    if args.sweep:
        sweep(device)
    tiles = default_tiles(HEAD_DIM, torch.device(device))
    print(f"# prefill: causal, {HEADS} q / {KV_HEADS} kv heads, d={HEAD_DIM}, bf16, 16k tokens"
          f" per launch, paged (block {PAGE}); tiles {tiles}")
    print("| seq | batch | ours TFLOP/s | SDPA flash | SDPA default | ours/flash | ours/default |")
    print("|---|---|---|---|---|---|---|")
    for seq in (1024, 4096, 16384):
        r = bench_prefill(seq, device, None)
        print(f"| {seq} | {16384 // seq} | {r['ours']:.0f} | {r['sdpa_flash']:.0f} | "
              f"{r['sdpa_default']:.0f} | {r['ours'] / r['sdpa_flash']:.2f} | "
              f"{r['ours'] / r['sdpa_default']:.2f} |")
    copy = copy_bandwidth(device) / 1e9  # GB/s
    print(f"# decode: 1 token/seq, K+V bytes read / time; copy bandwidth {copy:.0f} GB/s")
    print("| batch | context | GB/s | % of copy |")
    print("|---|---|---|---|")
    for batch in (1, 16, 64, 256):
        for context in (1024, 4096, 16384):
            if not _fits(batch, context):
                print(f"| {batch} | {context} | skipped (memory) | |")
                continue
            gbs = bench_decode(batch, context, device, None)
            print(f"| {batch} | {context} | {gbs:.0f} | {100 * gbs / copy:.0f}% |")
            torch.cuda.empty_cache()
    print_fp8_decode(device)
    return 0


def print_fp8_decode(device: str) -> None:
    """Decode attention over an fp8 KV cache vs bf16, same shapes, same run (half the KV
    bytes: the memory-bound shapes should approach 0.5x)."""
    print("# decode, fp8 (e4m3) KV vs bf16 KV: bf16 queries, dequantized in the kernel; "
          "ms per step, ratio = fp8 / bf16; fp8 GB/s counts the fp8 bytes read")
    print("| batch | context | bf16 ms | fp8 ms | fp8/bf16 | fp8 GB/s |")
    print("|---|---|---|---|---|---|")
    for batch, context in ((1, 4096), (1, 16384), (16, 4096), (64, 4096), (256, 1024)):
        if not _fits(batch, context):
            continue
        base = decode_ms(batch, context, device, None)
        fp8 = decode_ms(batch, context, device, None, kv_dtype=FP8_DTYPE)
        fp8_gbs = 2 * batch * context * KV_HEADS * HEAD_DIM / fp8 / 1e6
        print(f"| {batch} | {context} | {base:.3f} | {fp8:.3f} | {fp8 / base:.2f} | "
              f"{fp8_gbs:.0f} |")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
