"""Launch shapes shared by the weight-streaming matmuls (kernels/quant_w4a16.py,
kernels/quant_w8a16.py): at decode sizes a matmul reads its whole weight for a handful of rows,
and its output tiles alone are too few to keep every SM streaming, so K is split across
programs whose float32 partial sums are added afterwards. Also the scales both matrix-vector
kernels multiply x by before reading weights as float32 denormals (`X_EXP`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.activation import silu_and_mul, silu_mul

TARGET_PROGRAMS = 264
"""About two programs per SM of an H100 (132 SMs)."""
MIN_SPLIT_ROWS = 512
"""A split streams at least this many rows of K (fewer make the partial sums dominate)."""
GEMV_MAX_ROWS = 4
"""Up to this many rows of x the matmuls run as matrix-vector products (one program per row
and column tile, broadcast multiply and a sum over K): tl.dot would pad M to 16 and send every
dequantized weight tile through shared memory for 1/16 of the tensor cores' work."""


X_EXP = 96
"""The matrix-vector kernels read a weight field masked in place at bit p of a word as a float32
denormal q 2^(p - 149) (W4A16's nibbles, int8's bytes) and scale x by 2^(X_EXP - p) before the
multiply: every product is then x q 2^(X_EXP - 149), exact before one rounding and a normal
float for any |x q| above 2^(23 - X_EXP) (1e-22), while x 2^X_EXP stays finite for any |x|
below 2^(128 - X_EXP) (4e9): float32 precision over that range of activations."""
X_SCALE0: tl.constexpr = tl.constexpr(2.0 ** X_EXP)
X_SCALE4: tl.constexpr = tl.constexpr(2.0 ** (X_EXP - 4))
X_SCALE8: tl.constexpr = tl.constexpr(2.0 ** (X_EXP - 8))
X_SCALE12: tl.constexpr = tl.constexpr(2.0 ** (X_EXP - 12))
X_SCALE16: tl.constexpr = tl.constexpr(2.0 ** (X_EXP - 16))
PRODUCT_SCALE: tl.constexpr = tl.constexpr(2.0 ** (149 - X_EXP))
"""What turns a sum of such products back into sum x q."""


def split_k_config(m: int, n: int, k: int, block_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for an [m, k] x [k, n] weight-streaming matmul;
    `block_k` is the largest K tile the weight's layout allows."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if m <= 32 else 128
    if m > 64:
        return block_m, block_n, min(block_k, 64), 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    return block_m, block_n, block_k, splits_for(tiles, k)


def dot_launch(m: int, n: int, k: int, block_k: int, launch: dict | None = None) -> dict:
    """Launch configuration of a tl.dot form (m > GEMV_MAX_ROWS): block_m, block_n, block_k,
    split, num_warps, num_stages from `split_k_config`, any of them taken from `launch` (the
    benchmark's --sweep; split recomputed from the tiles unless given)."""
    block_m, block_n, block_k, split = split_k_config(m, n, k, block_k)
    config = {"block_m": block_m, "block_n": block_n, "block_k": block_k,
              "num_warps": 4, "num_stages": 3}
    config.update(launch or {})
    if "split" not in config:
        config["split"] = split if m > 64 else splits_for(
            triton.cdiv(m, config["block_m"]) * triton.cdiv(n, config["block_n"]), k)
    return config


def dot_plan(
    m: int, n: int, k: int, block_k: int, launch: dict | None,
    dtype: torch.dtype, device: torch.device,
) -> tuple[SplitOutput, tuple[int, int, int], dict]:
    """Everything a tl.dot form's launch needs from `dot_launch` and `split_output`: (output,
    grid (m tiles, n tiles, splits), meta-parameters BLOCK_M, BLOCK_N, BLOCK_K, SPLIT,
    num_warps, num_stages and any other key `launch` gave)."""
    config = dot_launch(m, n, k, block_k, launch)
    block_m, block_n = config.pop("block_m"), config.pop("block_n")
    block_k = config.pop("block_k")
    tiles = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    out = split_output(m, n, k, block_k, config.pop("split"), dtype, device, tiles)
    return out, out.grid, {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                           "SPLIT": out.split, **config}


def splits_for(tiles: int, k: int) -> int:
    """How many ways to split K so that `tiles` output tiles make about TARGET_PROGRAMS
    programs, each streaming at least MIN_SPLIT_ROWS rows."""
    split = 1
    while tiles * split < TARGET_PROGRAMS and k // (split * 2) >= MIN_SPLIT_ROWS:
        split *= 2
    return split


def gemv_launch(
    m: int, n: int, k: int, defaults: dict, launch: dict | None = None,
) -> dict:
    """Launch configuration of a matrix-vector form (m <= GEMV_MAX_ROWS; one program per row
    of x and block_n columns): block_n, block_k, split, num_warps, num_stages and any other
    key (prefetch) from the kernel's `defaults` for this shape, or from `launch` where given
    (the benchmark's --sweep: its keys over the defaults' block_n and block_k only); split from
    the others unless given."""
    if launch is not None:
        defaults = {"block_n": defaults["block_n"], "block_k": defaults["block_k"], **launch}
    config = {"num_warps": 4, "num_stages": 3, **defaults}
    if "split" not in config:
        config["split"] = splits_for(column_tiles(m, n, config["block_n"]), k)
    return config


def column_tiles(m: int, n: int, block_n: int) -> int:
    """Programs of a matrix-vector launch before any split: rows times column tiles."""
    return m * triton.cdiv(n, block_n)


@dataclass(frozen=True)
class SplitOutput:
    """Where a weight-streaming matmul writes: `out` [m, n] in x's dtype is the result; with a
    split, `parts` float32 [splits, m, n] holds each split's partial sums and `counts` (int32
    per output tile, zero between launches) how many splits of a tile have arrived, so the last
    one adds them up in the same launch (`finish`). Without a split `parts` is `out` and
    `counts` is never touched."""

    out: torch.Tensor
    parts: torch.Tensor
    counts: torch.Tensor
    k_per_split: int
    splits: int
    tiles: tuple[int, int]

    @property
    def split(self) -> bool:
        return self.splits > 1

    @property
    def grid(self) -> tuple[int, int, int]:
        """The launch grid: output tiles on axes 0 and 1 (the counters `finish` indexes),
        splits on axis 2."""
        return (*self.tiles, self.splits)

    @property
    def part_stride(self) -> int:
        return self.parts.stride(0) if self.split else 0


MAX_TILES = 1 << 16
"""Output tiles one split launch may have (entries of a device's arrival counters)."""
_COUNTS: dict[torch.device, torch.Tensor] = {}


def arrival_counts(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's arrival counters (zeros; every split launch leaves them zero again), made
    once so that CUDA graphs captured with them stay valid. One set per device: split launches
    on one device must not overlap in time (they are ordered on the engine's stream; no other
    stream runs the quantized matmuls)."""
    assert tiles <= MAX_TILES, f"{tiles} output tiles > {MAX_TILES}"
    device = torch.device(device)
    if device not in _COUNTS:
        _COUNTS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTS[device]


def split_length(k: int, block_k: int, split: int) -> int:
    """Rows of K each of up to `split` programs takes: whole K tiles."""
    return triton.cdiv(triton.cdiv(k, split), block_k) * block_k


def split_count(k: int, block_k: int, split: int) -> int:
    """Programs along K that `split_output` makes of a requested `split`."""
    return triton.cdiv(k, split_length(k, block_k, split))


def split_output(
    m: int, n: int, k: int, block_k: int, split: int, dtype: torch.dtype, device: torch.device,
    tiles: tuple[int, int],
) -> SplitOutput:
    """The output of a launch with `tiles` output tiles (grid axes 0 and 1) and up to `split`
    programs along K (grid axis 2); launch it on its `grid`. Splits are whole K tiles, so
    there may be fewer than asked."""
    k_per_split = split_length(k, block_k, split)
    splits = split_count(k, block_k, split)
    out = torch.empty((m, n), dtype=dtype, device=device)
    if splits == 1:
        return SplitOutput(out, out, out, k_per_split, 1, tiles)
    parts = torch.empty((splits, m, n), dtype=torch.float32, device=device)
    counts = arrival_counts(device, tiles[0] * tiles[1])
    return SplitOutput(out, parts, counts, k_per_split, splits, tiles)


@triton.jit
def finish(out_ptr, part_ptr, count_ptr, value, offs, mask, stride_os, SPLIT: tl.constexpr):
    """Writes a program's float32 result `value` at element offsets `offs` of the output.
    Without a split: rounded once into out. With one: as split program_id(2)'s partial sums;
    the split that arrives last at this output tile (grid axes 0 and 1) adds all partials in
    split order, rounds once into out and resets the tile's counter, so a split matmul is one
    launch rather than a matmul and a reduction (a launch costs ~2-3 us at decode). The
    barrier makes the CTA's partial stores precede the counter's release; the partials are
    read past L1 (.cg), which is not coherent across SMs."""
    if SPLIT:
        splits = tl.num_programs(2)
        tl.store(part_ptr + tl.program_id(2) * stride_os + offs, value, mask=mask)
        tl.debug_barrier()
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == splits - 1:
            total = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, splits):
                total += tl.load(part_ptr + s * stride_os + offs, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0)
    else:
        tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, BLOCK_K: tl.constexpr):
    """Rows offs_m, columns [k0, k0 + BLOCK_K) of the activations x [M, K] (zeros outside)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    return tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=mask,
                   other=0.0)


@triton.jit
def store_tile(out_ptr, part_ptr, count_ptr, acc, offs_m, offs_n, M, N, stride_os, stride_om,
               SPLIT: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile of the [M, N] output (see `finish`)."""
    offs = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    finish(out_ptr, part_ptr, count_ptr, acc, offs, mask, stride_os, SPLIT)


@triton.jit
def load_x(ptrs, mask, inter, GATED: tl.constexpr, EVEN: tl.constexpr = False):
    """The matrix-vector kernels' activations at `ptrs` (zeros where not `mask`), in x's
    dtype. GATED: x is an MLP's gate/up output [M, 2 * inter] and the matmul's input is
    silu(gate) * up (kernels/activation.py `silu_mul`: the same bits as its own kernel), so
    the down projection needs no activation launch and no round trip of its input. EVEN:
    every pointer is in bounds, loaded without the mask."""
    if EVEN:
        if GATED:
            return silu_mul(tl.load(ptrs), tl.load(ptrs + inter))
        return tl.load(ptrs)
    if GATED:
        return silu_mul(tl.load(ptrs, mask=mask, other=0.0),
                        tl.load(ptrs + inter, mask=mask, other=0.0))
    return tl.load(ptrs, mask=mask, other=0.0)


def gated_rows(x: torch.Tensor, gated: bool, gemv_ok: bool = True) -> tuple[torch.Tensor, bool]:
    """(x, whether the kernel applies the activation): a gated x of more than GEMV_MAX_ROWS
    rows, or whose weight the matrix-vector form does not take (`gemv_ok` False), goes to a
    tl.dot form, which takes no prologue, so it gets silu(gate) * up here."""
    if gated and (x.shape[0] > GEMV_MAX_ROWS or not gemv_ok):
        return silu_and_mul(x), False
    return x, gated


@triton.jit
def gemv_program(N, K, k_per_split, BLOCK_N: tl.constexpr):
    """A matrix-vector program's (row of x, split, column offsets, in-N mask, first and end
    row of K): grid (rows, column tiles, splits)."""
    row, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * k_per_split
    return row, pid_k, offs_n, offs_n < N, k_start, tl.minimum(k_start + k_per_split, K)


@triton.jit
def store_row(out_ptr, part_ptr, count_ptr, acc, row, offs_n, N, stride_os, stride_om,
              SPLIT: tl.constexpr):
    """Columns offs_n of output row `row` (the matrix-vector kernels; see `finish`)."""
    finish(out_ptr, part_ptr, count_ptr, acc, row.to(tl.int64) * stride_om + offs_n,
           offs_n < N, stride_os, SPLIT)
