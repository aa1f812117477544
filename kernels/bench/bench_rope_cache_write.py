"""`python -m kernels.bench.bench_rope_cache_write`: RoPE + KV cache write per layer, as two
kernels (kernels/rotary.py then kernels/cache_write.py) and fused (kernels/rotary_cache_write.py).

    python -m kernels.bench.bench_rope_cache_write [--tokens 1 8 64]

Llama-3-8B shapes (32 q heads, 8 kv heads, head_dim 128, bf16 activations), bf16 and fp8
caches. Timing is what the engine's decode sees: 32 calls (one per layer) replayed from one
CUDA graph, so launch gaps inside the graph are included and host overhead is not; us per
layer. The ratio is fused / two kernels, measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

LAYERS = 32


def _graph_us(fn) -> float:
    from triton.testing import do_bench

    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            fn()
    return do_bench(graph.replay) * 1e3 / LAYERS


def bench(tokens: int, cache_dtype: torch.dtype) -> tuple[float, float]:
    from kernels.cache_write import write_kv_cache
    from kernels.rotary import apply_rotary
    from kernels.rotary_cache_write import rotary_cache_write

    dev = "cuda"
    qkv = torch.randn(tokens, 48, 128, dtype=torch.bfloat16, device=dev)
    q, k, v = qkv.split([32, 8, 8], dim=1)
    # Plain RoPE tables (theta 500000, head_dim 128): the values do not change the timing.
    inv_freq = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float32, device=dev) / 128)
    angles = torch.arange(8192, dtype=torch.float32, device=dev)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    positions = torch.randint(0, 8192, (tokens,), device=dev)
    slots = torch.randperm(4096 * 16, device=dev)[:tokens]
    k_cache = torch.zeros(4096, 16, 8, 128, dtype=cache_dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    scale = torch.ones(1, device=dev)

    def two_kernels():
        apply_rotary(q, k, positions, cos, sin)
        write_kv_cache(k, v, k_cache, v_cache, slots, scale, scale)

    def fused():
        rotary_cache_write(q, k, v, k_cache, v_cache, slots, positions, cos, sin, scale, scale)

    return _graph_us(two_kernels), _graph_us(fused)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 1
    from kernels.kv_quant import FP8_DTYPE

    print(f"device:  {torch.cuda.get_device_name()}")
    print(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}   "
          f"{LAYERS} layers per CUDA graph replay, us per layer")
    print(f"{'cache':<7}{'tokens':>7}{'two kernels us':>16}{'fused us':>10}{'fused/two':>11}")
    for name, dtype in (("bf16", torch.bfloat16), ("fp8", FP8_DTYPE)):
        for tokens in args.tokens:
            two, one = bench(tokens, dtype)
            print(f"{name:<7}{tokens:>7}{two:>16.2f}{one:>10.2f}{one / two:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
