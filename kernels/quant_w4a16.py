"""W4A16: a matmul whose weight stays 4-bit, dequantized tile by tile inside the kernel.

The weight layout (GPTQ's, with groups made contiguous; workers/model/quant/ converts GPTQ and
AWQ checkpoints into it at load):

    qweight  int32 [K / 8, N]   input row 8i + j of column n in bits 4j..4j+3 of qweight[i, n]
    scales   [G, N]             float16 (as checkpoints store them)
    zeros    [G, N]             the integer zero point of each group, as the scales' dtype
    w[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]
    y = x @ w                   (x [M, K] float16 / bfloat16 / float32)

or, with `min_form` (GGUF Q4_1, whose offset is not an integer zero point), `zeros` holds
each group's minimum m and w[k, n] = q[k, n] * scales[g, n] + m[g, n].

G = ceil(K / group_size): the last group may be shorter (K = 576, group 128). The tl.dot
form dequantizes in float32 and rounds once to x's dtype (the tensor cores' operand), so
`dequantize_w4_ref(...).to(x.dtype)` is exactly the weight it multiplies by; the
matrix-vector form multiplies by the float32 weight unrounded (`w4a16_matmul_ref` follows).

Decode (M <= 16) is bandwidth-bound and has too few output tiles to fill the GPU, so K is
split across programs and the float32 partial sums are added by the last split of each tile
(kernels/quant_split_k.py `finish`). Up to
GEMV_MAX_ROWS rows run `_w4a16_gemv_kernel` instead: no tl.dot (which pads M to 16 and stages
the dequantized tile through shared memory). It reads each packed word once and widens its
nibbles with one logic op per weight (each masked nibble read as a float32 denormal) rather
than int -> float conversions, which run at a quarter of the ALU rate and made an earlier form
(one conversion per weight, ~0.5 TB/s on an H100) compute-bound; see its docstring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels import quant_split_k as split_k
from kernels.attention_tile import dot_precision
from kernels.quant_split_k import gemv_program, load_x, load_x_tile, store_row, store_tile

GEMV_TILE = {"block_n": 32, "block_k": 512}
"""Default tile of the matrix-vector form (columns, input rows), next tile not prefetched."""
GEMV_FEW_COLUMNS = {"block_n": 16, "block_k": 1024, "prefetch": True, "split": 1}
"""The form's launch where 32-column tiles would give fewer than split_k.TARGET_PROGRAMS
programs over K <= GEMV_FEW_COLUMNS_MAX_K: twice the programs with no split (no partial sums)
and two 8 KB weight tiles in flight per program; otherwise K is split across 8 warps. The best
per projection of Llama-3-8B at M = 1 on an H200 (devrun sweep, two passes, 2026-11-28 10:47
UTC, us): q/k/v 6.8 vs 10.5 with the default tile, o 6.4 vs 7.1, down (split, 8 warps) 15.3 vs
16.7; gate_up (896 column tiles) keeps the default, 25.1."""
GEMV_FEW_COLUMNS_MAX_K = 4096


def gemv_defaults(m: int, n: int, k: int) -> dict:
    """The matrix-vector form's launch for an [m, k] x [k, n] product (see GEMV_FEW_COLUMNS)."""
    if split_k.column_tiles(m, n, GEMV_TILE["block_n"]) >= split_k.TARGET_PROGRAMS:
        return dict(GEMV_TILE)
    if k <= GEMV_FEW_COLUMNS_MAX_K:
        return dict(GEMV_FEW_COLUMNS)
    return {**GEMV_TILE, "num_warps": 8}


ROW_UNPACK = False
"""Default nibble unpacking of the tl.dot kernel (`_w4a16_kernel`'s ROW_UNPACK); the
benchmark's --sweep times both."""


@triton.jit
def _dequantize_tile(q, s_ptr, z_ptr, k0, offs_n, N, K, group_size, stride_sg,
                     BLOCK_K: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
                     MIN_FORM: tl.constexpr):
    """The float32 nibbles q [BLOCK_K, BLOCK_N] of rows [k0, k0 + BLOCK_K) dequantized with
    their groups' scales and zeros (or minimums), in float32. GROUP_PER_TILE: every K
    tile lies inside one group (group_size % BLOCK_K == 0), so one row of scales/zeros serves
    the whole tile; otherwise each row finds its own group."""
    n_ok = offs_n < N
    if GROUP_PER_TILE:
        g_off = (k0 // group_size) * stride_sg + offs_n
        s = tl.load(s_ptr + g_off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + g_off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        g_off = (offs_k // group_size)[:, None] * stride_sg + offs_n[None, :]
        g_mask = (offs_k < K)[:, None] & n_ok[None, :]
        s = tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
    if MIN_FORM:
        return q * s + z
    return (q - z) * s


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_qk, stride_sg, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_PER_TILE: tl.constexpr, MIN_FORM: tl.constexpr, PRECISION: tl.constexpr,
    ROW_UNPACK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """BLOCK_M rows of x times BLOCK_N columns over split pid_k's rows of K (tl.dot).
    ROW_UNPACK: each k's packed word loaded by offs_k // 8 (L1 serves the repeats), as the
    matrix-vector kernel does; otherwise [BLOCK_K / 8, BLOCK_N] words are loaded once and
    their nibbles reshaped to [BLOCK_K, BLOCK_N]."""
    pdl.enter(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = load_x_tile(x_ptr, offs_m, k0, M, K, stride_xm, BLOCK_K)
        if ROW_UNPACK:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            packed = tl.load(
                qw_ptr + (offs_k // 8)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                mask=(offs_k < K)[:, None] & n_ok[None, :], other=0,
            )
            q = ((packed >> ((offs_k % 8) * 4)[:, None]) & 0xF).to(tl.float32)
        else:
            offs_p = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            packed = tl.load(
                qw_ptr + offs_p[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                mask=(offs_p[:, None] < K // 8) & n_ok[None, :], other=0,
            )
            # [BLOCK_K / 8, 8, BLOCK_N] -> [BLOCK_K, BLOCK_N]: row 8i + j is nibble j of row i.
            q = tl.reshape((packed[:, None, :] >> shifts) & 0xF,
                           (BLOCK_K, BLOCK_N)).to(tl.float32)
        w = _dequantize_tile(q, s_ptr, z_ptr, k0, offs_n, N, K, group_size, stride_sg,
                             BLOCK_K, GROUP_PER_TILE, MIN_FORM).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    store_tile(out_ptr, part_ptr, count_ptr, acc, offs_m, offs_n, M, N, stride_os, stride_om,
               SPLIT)


X_EXP = 96
"""`_nibble_products` scales x by 2^(X_EXP - p) before multiplying by a nibble at bit p: every
product is then x q 2^(X_EXP - 149), a normal float for any |x q| above 2^(23 - X_EXP)
(1e-22), and x 2^X_EXP stays finite for any |x| below 2^(128 - X_EXP) (4e9): float32
precision over that range of activations."""
X_SCALE0: tl.constexpr = tl.constexpr(2.0 ** X_EXP)
X_SCALE4: tl.constexpr = tl.constexpr(2.0 ** (X_EXP - 4))
X_SCALE8: tl.constexpr = tl.constexpr(2.0 ** (X_EXP - 8))
X_SCALE12: tl.constexpr = tl.constexpr(2.0 ** (X_EXP - 12))
X_SCALE16: tl.constexpr = tl.constexpr(2.0 ** (X_EXP - 16))
PRODUCT_SCALE: tl.constexpr = tl.constexpr(2.0 ** (149 - X_EXP))
"""What turns a sum of `_nibble_products` back into sum x q."""


@triton.jit
def _nibble_denormal(word, p: tl.constexpr):
    """q 2^(p - 149) for the nibble q at bits p..p+3 of every word (p <= 19): masked in place
    it is the mantissa of a float32 whose exponent bits are zero, a denormal, exactly, in one
    logic op. Float32 arithmetic keeps denormals at full speed on the GPU (Triton emits no
    flush-to-zero) and in numpy (TRITON_INTERPRET)."""
    return (word & (0xF << p)).to(tl.float32, bitcast=True)


@triton.jit
def _nibble_products(packed, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum_j x_j q_j 2^(X_EXP - 149) per word, [W, BLOCK_N] in float32, for x_j [W] the input
    row of nibble j of each word row. Nibbles 0..4 (bits 0..19) are read in place; 5..7 lie
    at bits 8..19 of word >> 12. Each product x_j 2^(X_EXP - p) * q 2^(p - 149) is exact
    before its one rounding, as a plain float32 x q would be."""
    hi = packed >> 12
    part = (x0 * X_SCALE0)[:, None] * _nibble_denormal(packed, 0)
    part += (x1 * X_SCALE4)[:, None] * _nibble_denormal(packed, 4)
    part += (x2 * X_SCALE8)[:, None] * _nibble_denormal(packed, 8)
    part += (x3 * X_SCALE12)[:, None] * _nibble_denormal(packed, 12)
    part += (x4 * X_SCALE16)[:, None] * _nibble_denormal(packed, 16)
    part += (x5 * X_SCALE8)[:, None] * _nibble_denormal(hi, 8)
    part += (x6 * X_SCALE12)[:, None] * _nibble_denormal(hi, 12)
    part += (x7 * X_SCALE16)[:, None] * _nibble_denormal(hi, 16)
    return part


@triton.jit
def _x_by_nibble(x_row, k_w, w_ok, inter, GATED: tl.constexpr):
    """x[k_w + j] for j = 0..7 (the input rows of nibble j of each packed row), from one
    [BLOCK_K / 8, 8] load split into eight [BLOCK_K / 8] columns, as float32 (GATED: see
    quant_split_k.load_x)."""
    x = load_x(x_row + k_w[:, None] + tl.arange(0, 8)[None, :], w_ok[:, None], inter,
               GATED).to(tl.float32)
    # [W, 8] -> [W, a, b, c] with j = 4a + 2b + c; each split takes the last axis.
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2, 2)))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _load_w4_words(qw_ptr, s_ptr, z_ptr, k0, k_end, offs_w, offs_n, n_ok, group_size,
                   stride_qk, stride_sg, GROUP_PER_TILE: tl.constexpr):
    """Packed rows [k0 / 8, k0 / 8 + BLOCK_K / 8) of the weight's columns offs_n (zeros at or
    past k_end), their groups' scales and zeros as float32 ([1, BLOCK_N] when the tile lies in
    one group, else one row per packed row), the tile's first input row per packed row, and
    which packed rows are real."""
    k_w = k0 + offs_w * 8
    w_ok = k_w < k_end
    packed = tl.load(
        qw_ptr + (k_w // 8)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
        mask=w_ok[:, None] & n_ok[None, :], other=0,
    )
    if GROUP_PER_TILE:
        g_off = (k0 // group_size) * stride_sg + offs_n[None, :]
        g_ok = (n_ok & (offs_n * 0 + k0 < k_end))[None, :]  # no read past the last tile
    else:
        g_off = (k_w // group_size)[:, None] * stride_sg + offs_n[None, :]
        g_ok = w_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g_off, mask=g_ok, other=0.0).to(tl.float32)
    return packed, s, z, k_w, w_ok


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    N, K, group_size, k_per_split,
    stride_xm, stride_qk, stride_sg, stride_os, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_PER_TILE: tl.constexpr, MIN_FORM: tl.constexpr, PREFETCH: tl.constexpr,
    GATED: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """One row of x (program axis 0) times BLOCK_N columns over split pid_k's rows of K.

    Each packed word [BLOCK_K / 8, BLOCK_N] is loaded once, and x once per tile (one
    [BLOCK_K / 8, 8] load split by nibble). `_nibble_products` gives sum_j x[8i + j] q_j per
    word row with one logic op and one multiply-add per weight; with X = sum_j x[8i + j],
    sum_j x (q - z) = that - z X (min form: s times it, plus m X), so no subtraction runs per
    weight and the group scale is applied once per word (a packed row lies inside one group:
    group sizes are multiples of 8). The sum over K is taken once after the loop. This
    widening halved the logic ops of the previous one (a shift and a logic op per weight into
    1 + q / 16): 78.9 -> 59.7 us over Llama-3-8B's four projections at M = 1 on an H200
    (devrun A/B, 2026-11-28 10:38 UTC), the decode graph 2.69 -> 2.31 ms. PREFETCH: the next
    tile's loads are issued before this tile's arithmetic (two tiles in flight per program;
    Triton pipelines only loads that feed tl.dot)."""
    row, pid_k, offs_n, n_ok, k_start, k_end = gemv_program(N, K, k_per_split, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    packed, s, z, k_w, w_ok = _load_w4_words(qw_ptr, s_ptr, z_ptr, k_start, k_end, offs_w,
                                             offs_n, n_ok, group_size, stride_qk, stride_sg,
                                             GROUP_PER_TILE)
    pdl.enter(PDL)  # after the first tile's weight loads: they never depend on the step
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            n_packed, n_s, n_z, n_k_w, n_w_ok = _load_w4_words(
                qw_ptr, s_ptr, z_ptr, k0 + BLOCK_K, k_end, offs_w, offs_n, n_ok, group_size,
                stride_qk, stride_sg, GROUP_PER_TILE)
        xs = _x_by_nibble(x_row, k_w, w_ok, K, GATED)
        x_sum = ((xs[0] + xs[1]) + (xs[2] + xs[3])) + ((xs[4] + xs[5]) + (xs[6] + xs[7]))
        x_q = _nibble_products(packed, xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6],
                               xs[7]) * PRODUCT_SCALE  # sum_j x q per word row
        if MIN_FORM:  # sum x (q s + m) = s sum x q + m sum x
            acc += x_q * s + x_sum[:, None] * z
        else:
            acc += (x_q - z * x_sum[:, None]) * s
        if PREFETCH:
            packed, s, z, k_w, w_ok = n_packed, n_s, n_z, n_k_w, n_w_ok
        else:
            packed, s, z, k_w, w_ok = _load_w4_words(
                qw_ptr, s_ptr, z_ptr, k0 + BLOCK_K, k_end, offs_w, offs_n, n_ok, group_size,
                stride_qk, stride_sg, GROUP_PER_TILE)
    store_row(out_ptr, part_ptr, count_ptr, tl.sum(acc, axis=0), row, offs_n, N, stride_os,
              stride_om, SPLIT)


def _check(x, qweight, scales, zeros, group_size, gated: bool) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"x {tuple(x.shape)} stride {x.stride()}"
    k = x.shape[1] // 2 if gated else x.shape[1]
    assert k % 8 == 0, f"K {k} is not a multiple of 8"
    assert group_size % 8 == 0, f"group size {group_size} is not a multiple of 8"
    assert qweight.dtype == torch.int32 and qweight.shape[0] == k // 8, (
        f"qweight {qweight.dtype} {tuple(qweight.shape)} vs K {k}")
    assert qweight.stride(1) == 1, f"qweight stride {qweight.stride()}"
    groups = -(-k // group_size)
    assert scales.shape == (groups, qweight.shape[1]), (
        f"scales {tuple(scales.shape)}, expected ({groups}, {qweight.shape[1]}) for K {k}, "
        f"group size {group_size}")
    assert zeros.shape == scales.shape and zeros.stride() == scales.stride(), (
        f"zeros {tuple(zeros.shape)} stride {zeros.stride()} vs scales {scales.stride()}")
    assert scales.stride(1) == 1, f"scales stride {scales.stride()}"


def w4a16_matmul(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int32 [K / 8, N]
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor,  # [G, N]
    group_size: int,
    min_form: bool = False,
    launch: dict | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """x @ dequantized weight, [M, N] in x's dtype (float32 accumulation). `launch` overrides
    the launch configuration (split_k.gemv_launch up to GEMV_MAX_ROWS rows, else
    split_k.dot_launch plus row_unpack), for the benchmark's --sweep. `gated`: x is
    [M, 2K] (an MLP's gate, then up) and the input is silu(gate) * up."""
    _check(x, qweight, scales, zeros, group_size, gated)
    x, gated = split_k.gated_rows(x, gated)
    m, n, k = x.shape[0], qweight.shape[1], qweight.shape[0] * 8
    group_k = 128 if group_size % 128 == 0 else (64 if group_size % 64 == 0 else 32)
    if 0 < m <= split_k.GEMV_MAX_ROWS:
        return w4a16_gemv(x, qweight, scales, zeros, group_size, min_form,
                          **split_k.gemv_launch(m, n, k, gemv_defaults(m, n, k), launch),
                          gated=gated)
    out, grid, meta = split_k.dot_plan(m, n, k, group_k, launch, x.dtype, x.device)
    row_unpack = meta.pop("row_unpack", ROW_UNPACK)
    if m > 0:
        _w4a16_kernel[grid](
            x, qweight, scales, zeros, out.out, out.parts, out.counts,
            m, n, k, group_size, out.k_per_split,
            x.stride(0), qweight.stride(0), scales.stride(0), out.part_stride, n,
            GROUP_PER_TILE=group_size % meta["BLOCK_K"] == 0, MIN_FORM=min_form,
            PRECISION=dot_precision(x.dtype), ROW_UNPACK=row_unpack, **meta,
            **pdl.launch(x.device),
        )
    return out.out


def w4a16_gemv(
    x, qweight, scales, zeros, group_size: int, min_form: bool, *,
    block_n: int, block_k: int, split: int, num_warps: int, num_stages: int,
    prefetch: bool = False, gated: bool = False,
) -> torch.Tensor:
    """The matrix-vector form of `w4a16_matmul` with an explicit launch configuration (the
    benchmark's --sweep times several); `block_k` at most the group size for one scale row per
    tile."""
    m, n, k = x.shape[0], qweight.shape[1], qweight.shape[0] * 8
    out = split_k.split_output(m, n, k, block_k, split, x.dtype, x.device,
                               (m, triton.cdiv(n, block_n)))
    _w4a16_gemv_kernel[out.grid](
        x, qweight, scales, zeros, out.out, out.parts, out.counts,
        n, k, group_size, out.k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.part_stride, n,
        BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_PER_TILE=group_size % block_k == 0, MIN_FORM=min_form, PREFETCH=prefetch,
        GATED=gated, SPLIT=out.split, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch(x.device),
    )
    return out.out


def unpack_rows_ref(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K / 8, N] -> int32 [K, N] of values 0..15 (row 8i + j from nibble j of row i)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nibbles = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF
    return nibbles.reshape(-1, qweight.shape[1])


def dequantize_w4_ref(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    min_form: bool = False,
) -> torch.Tensor:
    """The float32 weight [K, N] the layout describes."""
    q = unpack_rows_ref(qweight).float()
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    if min_form:
        return q * scales.float()[groups] + zeros.float()[groups]
    return (q - zeros.float()[groups]) * scales.float()[groups]


def w4a16_matmul_ref(x, qweight, scales, zeros, group_size, min_form=False):
    """Plain-torch reference of `w4a16_matmul`: the weight rounded to x's dtype above
    GEMV_MAX_ROWS rows (the tl.dot form's operand), kept in float32 up to it."""
    weight = dequantize_w4_ref(qweight, scales, zeros, group_size, min_form)
    if x.shape[0] > split_k.GEMV_MAX_ROWS:
        weight = weight.to(x.dtype)
    return (x.float() @ weight.float()).to(x.dtype)
