"""The weight-quantized matmul kernels against their plain-torch references: W4A16
(kernels/quant_w4a16.py), W8A16 (kernels/quant_w8a16.py) and the FP8 linear (kernels/quant_fp8.py,
GPU only: weight-only up to 64 rows, FP8 tensor cores above). Small shapes on CPU under
TRITON_INTERPRET=1 (float32, float16); Llama-3-8B's projection shapes in bfloat16 on the GPU."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul
from kernels.quant_fp8 import (
    FP8,
    FP8_MAX,
    fp8_linear,
    fp8_linear_ref,
    quantize_rows_fp8,
    quantize_rows_fp8_ref,
)
from kernels.quant_split_k import GEMV_MAX_ROWS, arrival_counts
from kernels.quant_w4a16 import dequantize_w4_ref, w4a16_matmul, w4a16_matmul_ref
from kernels.quant_w8a16 import channel_gemv, channel_matmul, w8a16_matmul, w8a16_matmul_ref
from tests.kernels.tolerances import assert_close

LLAMA3_8B_PROJECTIONS = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
"""(K, N) of Llama-3-8B's merged q/k/v, o, merged gate/up and down projections."""


def random_w4(k: int, n: int, group_size: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32,
                            generator=generator)
    scales = (torch.rand(groups, n, generator=generator) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 16, (groups, n), generator=generator).half()
    return qweight.to(device), scales.to(device), zeros.to(device)


def random_w8(k: int, n: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(n, generator=generator) * 0.002 + 1e-4
    return qweight.to(device), scales.to(device)


def random_x(m: int, k: int, dtype: torch.dtype, device: str, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=generator).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m,k,n,group_size",
    [
        (1, 256, 64, 128),  # one group per K tile
        (1, 2048, 32, 128),  # decode: K split across programs
        (3, 576, 96, 128),  # ragged last group (SmolLM2's hidden size)
        (5, 128, 48, 32),  # groups smaller than a K tile
        (20, 512, 72, 64),
        (70, 256, 130, 128),  # prefill-sized M, N not a multiple of the tile
    ],
)
def test_w4a16_kernel_matches_reference(m, k, n, group_size, dtype, device):
    qweight, scales, zeros = random_w4(k, n, group_size, device)
    x = random_x(m, k, dtype, device)
    out = w4a16_matmul(x, qweight, scales, zeros, group_size)
    assert out.shape == (m, n)
    assert_close(out, w4a16_matmul_ref(x, qweight, scales, zeros, group_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 2048, 32), (3, 576, 96), (40, 256, 64)])
def test_w4a16_kernel_in_min_form_matches_reference(m, k, n, dtype, device):
    """GGUF Q4_1's form, w = q * scale + min, groups of 32."""
    qweight, scales, _ = random_w4(k, n, 32, device)
    mins = -scales * torch.rand(scales.shape, generator=torch.Generator().manual_seed(4)).to(
        device).mul(15).half()
    x = random_x(m, k, dtype, device)
    out = w4a16_matmul(x, qweight, scales, mins, 32, min_form=True)
    assert_close(out, w4a16_matmul_ref(x, qweight, scales, mins, 32, min_form=True))


W4_GEMV_LAUNCHES = [
    {"block_n": 32, "block_k": 256, "unit_k": 64, "split": 1, "num_warps": 1, "num_stages": 1},
    {"block_n": 64, "block_k": 512, "unit_k": 32, "split": 3, "num_warps": 4, "num_stages": 1},
    {"block_n": 16, "block_k": 128, "split": 2, "num_warps": 2, "num_stages": 1},
    {"block_n": 32, "block_k": 1024, "split": 8, "num_warps": 4, "num_stages": 1},
]
"""W4A16 matrix-vector launches as the benchmark's --sweep passes them: units of one and two
per group, units below the group (32 of 64), lanes past K, odd and many splits."""
GEMV_LAUNCHES = [
    {"block_n": 32, "block_k": 64, "split": 1, "num_warps": 2, "num_stages": 2},
    {"block_n": 64, "block_k": 128, "split": 3, "num_warps": 4, "num_stages": 3,
     "prefetch": False},
    {"block_n": 128, "block_k": 256, "split": 8, "num_warps": 8, "num_stages": 4},
    {"block_n": 16, "block_k": 128, "split": 2, "num_warps": 4, "num_stages": 1,
     "prefetch": True},
]
"""Matrix-vector launch configurations as the benchmark's --sweep passes them: K tiles below,
at and above the group size (one scale row per tile, or one per k), odd and many splits."""
W4_ONLY = ("row_unpack",)
DOT_LAUNCHES = [
    {"row_unpack": True},
    {"block_m": 16, "block_n": 32, "block_k": 64, "split": 3, "num_warps": 2, "num_stages": 2,
     "row_unpack": True},
    {"block_m": 32, "block_n": 128, "block_k": 32, "split": 1, "num_warps": 8, "num_stages": 4},
]
"""tl.dot launch configurations (rows above GEMV_MAX_ROWS; row_unpack for W4A16 only)."""
GEMV_SHAPES = [(1, 1024, 96, 128), (4, 576, 40, 64)]
LAUNCH_CASES = [(launch, shape) for launch in GEMV_LAUNCHES for shape in GEMV_SHAPES] + [
    (launch, shape) for launch in DOT_LAUNCHES for shape in [(20, 1024, 96, 64),
                                                               (70, 576, 40, 128)]]
"""(launch, (M, K, N, group size))."""


@pytest.mark.parametrize("launch,shape", LAUNCH_CASES)
def test_launch_configurations_match_reference(launch, shape, device):
    m, k, n, group_size = shape
    x = random_x(m, k, torch.float32, device)
    qweight, scales, zeros = random_w4(k, n, group_size, device)
    if m > GEMV_MAX_ROWS:
        out = w4a16_matmul(x, qweight, scales, zeros, group_size, launch=launch)
        assert_close(out, w4a16_matmul_ref(x, qweight, scales, zeros, group_size))
    q8, s8 = random_w8(k, n, device)
    launch8 = {key: value for key, value in launch.items() if key not in W4_ONLY}
    assert_close(w8a16_matmul(x, q8, s8, launch=launch8), w8a16_matmul_ref(x, q8, s8))


@pytest.mark.parametrize("launch,shape", [(launch, shape) for launch in W4_GEMV_LAUNCHES
                                          for shape in GEMV_SHAPES])
@pytest.mark.parametrize("min_form", [False, True])
def test_w4a16_matrix_vector_launches_match_reference(launch, shape, min_form, device):
    m, k, n, group_size = shape
    x = random_x(m, k, torch.float32, device)
    qweight, scales, zeros = random_w4(k, n, group_size, device)
    if min_form:  # GGUF Q4_1's minimums: -scale * (a value in 0..15)
        zeros = -scales * torch.rand(scales.shape, generator=torch.Generator().manual_seed(4)
                                     ).to(device).mul(15).half()
    out = w4a16_matmul(x, qweight, scales, zeros, group_size, min_form, launch=launch)
    assert_close(out, w4a16_matmul_ref(x, qweight, scales, zeros, group_size, min_form))


@pytest.mark.parametrize("splits,m,n", [(3, 1, 200), (5, 3, 64), (2, 4, 8)])
def test_last_split_adds_the_partials_in_order_and_resets_its_counters(splits, m, n, device):
    """A split launch equals its splits run alone over their K ranges, added in split order
    (bit for bit, float32), and leaves every arrival counter at zero for the next launch."""
    k, block_k = splits * 128, 64
    x = random_x(m, k, torch.float32, device)
    weight, scales = random_w8(k, n, device)
    launch = {"block_n": 16, "block_k": block_k, "num_warps": 4, "num_stages": 1}
    out = channel_gemv(x, weight, scales, split=splits, **launch)
    parts = [channel_gemv(x[:, i * 128:(i + 1) * 128].contiguous(),
                          weight[:, i * 128:(i + 1) * 128].contiguous(), scales, split=1,
                          **launch) for i in range(splits)]
    expected = parts[0].clone()
    for part in parts[1:]:
        expected += part
    assert torch.equal(out, expected)
    assert torch.equal(channel_gemv(x, weight, scales, split=splits, **launch), out)
    assert not arrival_counts(device, 1).any()


def assert_w4a16_precision_from_tiny_to_huge_inputs(device: str) -> None:
    """The matrix-vector kernel scales x by up to 2^X_EXP before multiplying by nibbles read
    as denormals (kernels/quant_w4a16_gemv.py `_nibble_fma`): rows of x from 1e-20 to 1e9
    (the range it promises) give the float64 result to float32 precision."""
    k, n = 1024, 64
    qweight, scales, zeros = random_w4(k, n, 128, device)
    x = random_x(4, k, torch.float32, device) * torch.tensor(
        [[1e-20], [1e-6], [1.0], [1e9]], device=device)
    launch = {"block_n": 32, "block_k": 128, "num_warps": 4, "num_stages": 1}
    out = w4a16_matmul(x, qweight, scales, zeros, 128, launch=launch)
    weight = dequantize_w4_ref(qweight, scales, zeros, 128).double()
    ref = x.double() @ weight
    scale = x.double().abs() @ weight.abs()  # what float32 rounding is relative to
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs() / scale).max() < 1e-5


def test_w4a16_matrix_vector_form_holds_its_precision_from_tiny_to_huge_inputs(device):
    assert_w4a16_precision_from_tiny_to_huge_inputs(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_w4a16_denormal_nibbles_hold_their_precision_when_compiled():
    """The same on the GPU: compiled float32 arithmetic keeps the denormals (no flush to
    zero), which the interpreter's numpy cannot show."""
    assert_w4a16_precision_from_tiny_to_huge_inputs("cuda")


def test_w4a16_reference_dequantizes_the_layout_elementwise(device):
    """dequantize_w4_ref against the layout read one element at a time."""
    k, n, group_size = 48, 16, 16
    qweight, scales, zeros = random_w4(k, n, group_size, "cpu")
    weight = dequantize_w4_ref(qweight, scales, zeros, group_size)
    for row in range(k):
        for col in range(0, n, 5):
            q = (int(qweight[row // 8, col]) >> (4 * (row % 8))) & 0xF
            group = row // group_size
            expected = (q - float(zeros[group, col])) * float(scales[group, col])
            assert weight[row, col].item() == pytest.approx(expected, rel=1e-6)


def test_w4a16_with_no_rows_returns_an_empty_result(device):
    qweight, scales, zeros = random_w4(64, 16, 32, device)
    out = w4a16_matmul(random_x(0, 64, torch.float32, device), qweight, scales, zeros, 32)
    assert out.shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m,k,n", [(1, 256, 64), (1, 2048, 32), (3, 576, 96), (5, 2048, 48), (70, 192, 130)]
)
def test_w8a16_kernel_matches_reference(m, k, n, dtype, device):
    qweight, scales = random_w8(k, n, device)
    x = random_x(m, k, dtype, device)
    out = w8a16_matmul(x, qweight, scales)
    assert out.shape == (m, n)
    assert_close(out, w8a16_matmul_ref(x, qweight, scales))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [64, 3000])
def test_fp8_row_quantization_kernel_is_bit_equal_to_torch(k, dtype, device):
    rows = torch.tensor([[1e-3], [1], [10], [0], [5], [300]])
    x = (random_x(6, k, torch.float32, "cpu") * rows).to(dtype).to(device)
    x_q, scale = quantize_rows_fp8(x)
    ref_q, ref_scale = quantize_rows_fp8_ref(x)
    assert x_q.dtype == FP8 and scale.shape == (6, 1)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(x_q.view(torch.uint8), ref_q.view(torch.uint8))


def test_fp8_row_quantization_round_trips_within_e4m3_precision():
    x = random_x(6, 64, torch.float32, "cpu") * torch.tensor([[1e-3], [1], [10], [0], [5], [2]])
    x_q, scale = quantize_rows_fp8_ref(x)
    assert x_q.float().abs().amax() <= FP8_MAX
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each row's largest element.
    error = (x_q.float() * scale - x).abs()
    assert (error <= x.abs().amax(1, keepdim=True) / 16 + 1e-12).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 4, 32, 256])
@pytest.mark.parametrize("k,n", LLAMA3_8B_PROJECTIONS)
def test_quantized_kernels_at_llama3_8b_shapes_in_bfloat16(m, k, n):
    x = random_x(m, k, torch.bfloat16, "cuda")
    qweight, scales, zeros = random_w4(k, n, 128, "cuda")
    out = w4a16_matmul(x, qweight, scales, zeros, 128)
    expected = w4a16_matmul_ref(x, qweight, scales, zeros, 128)
    torch.testing.assert_close(out.float(), expected.float(), atol=0.05, rtol=0.02)
    q8, s8 = random_w8(k, n, "cuda")
    torch.testing.assert_close(w8a16_matmul(x, q8, s8).float(),
                               w8a16_matmul_ref(x, q8, s8).float(), atol=0.05, rtol=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs FP8 tensor cores (sm_89+)",
)
@pytest.mark.parametrize("m", [1, 4, 32, 65, 256])
@pytest.mark.parametrize("k,n", LLAMA3_8B_PROJECTIONS)
def test_fp8_linear_at_llama3_8b_shapes_matches_reference(m, k, n):
    x = random_x(m, k, torch.bfloat16, "cuda")
    generator = torch.Generator().manual_seed(2)
    weight = (torch.randn(n, k, generator=generator) * 100).clamp(-448, 448).to(FP8).cuda()
    scales = (torch.rand(n, generator=generator) * 1e-4 + 1e-5).cuda()
    out = fp8_linear(x, weight, scales)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    expected = fp8_linear_ref(x, weight, scales)
    torch.testing.assert_close(out.float(), expected.float(), atol=0.05, rtol=0.02)



def gated_cases(m: int, k: int, n: int, dtype: torch.dtype, device: str):
    """(gate/up output [m, 2k], silu(gate) * up by the activation kernel, the matmuls that
    take a gated input as (name, matmul(x, gated))) over one random weight of each format."""
    gate_up = random_x(m, 2 * k, dtype, device)
    qweight, scales, zeros = random_w4(k, n, 128, device)
    q16, s16, z16 = random_w4(k, n, 16, device)
    q8, s8 = random_w8(k, n, device)
    generator = torch.Generator().manual_seed(2)
    w_fp8 = (torch.randn(n, k, generator=generator) * 100).clamp(-448, 448).to(FP8).to(device)
    matmuls = [
        ("w4a16", lambda x, gated: w4a16_matmul(x, qweight, scales, zeros, 128, gated=gated)),
        # Groups of 16 take the tl.dot form at any M, which applies the activation first.
        ("w4a16 group 16", lambda x, gated: w4a16_matmul(x, q16, s16, z16, 16, gated=gated)),
        ("w8a16", lambda x, gated: w8a16_matmul(x, q8, s8, gated=gated)),
        ("fp8 channel", lambda x, gated: channel_matmul(x, w_fp8, s8, gated=gated)),
    ]
    return gate_up, silu_and_mul(gate_up), matmuls


@pytest.mark.parametrize("m", [1, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_input_gives_the_bits_of_the_activation_kernel_then_the_matmul(m, dtype, device):
    """gated=True (a down projection reading the MLP's gate/up output, the activation in the
    matrix-vector kernels' prologue; above GEMV_MAX_ROWS rows applied first) equals
    silu_and_mul's kernel followed by the matmul, bit for bit: the prologue rounds as that
    kernel does."""
    gate_up, activated, matmuls = gated_cases(m, 256, 48, dtype, device)
    for name, matmul in matmuls:
        assert torch.equal(matmul(gate_up, True), matmul(activated, False)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 4])
def test_gated_down_projection_at_llama3_8b_shape_in_bfloat16(m):
    """The fused activation at Llama-3-8B's down projection (K 14336, N 4096), compiled."""
    gate_up, activated, matmuls = gated_cases(m, 14336, 4096, torch.bfloat16, "cuda")
    for name, matmul in matmuls:
        assert torch.equal(matmul(gate_up, True), matmul(activated, False)), name
    x = gate_up.to(torch.float32)
    g, u = x.chunk(2, dim=-1)
    torch.testing.assert_close(activated.float(), (torch.nn.functional.silu(g) * u),
                               atol=0.02, rtol=0.02)


def every_byte_weight(n: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[N, K] one-byte weights holding every bit pattern (FP8: all but NaN's two, subnormals
    and -0.0 included) in shuffled order, repeated to fill N x K."""
    patterns = torch.arange(256, dtype=torch.int32)
    if dtype == FP8:
        patterns = patterns[(patterns & 0x7F) != 0x7F]
    order = torch.randperm(n * k, generator=torch.Generator().manual_seed(3))
    picks = patterns[order % len(patterns)].reshape(n, k)
    return picks.to(torch.uint8).view(dtype).to(device)


def assert_channel_precision_from_tiny_to_huge_inputs(weight_dtype, device: str) -> None:
    """The channel form scales x by up to 2^X_EXP before multiplying by bytes placed in
    float32 bit patterns, denormals among them (kernels/quant_w8a16.py `_widen_words`): rows
    of x from 1e-20 to 1e9 give the float64 result to float32 precision."""
    k, n = 1024, 64
    weight = every_byte_weight(n, k, weight_dtype, device)
    scales = torch.rand(n, generator=torch.Generator().manual_seed(5)).to(device) + 0.5
    x = random_x(4, k, torch.float32, device) * torch.tensor(
        [[1e-20], [1e-6], [1.0], [1e9]], device=device)
    launch = {"block_n": 16, "block_k": 256, "num_warps": 4, "num_stages": 1}
    out = channel_matmul(x, weight, scales, launch=launch)
    w = weight.double() * scales.double()[:, None]
    ref, scale = x.double() @ w.T, x.double().abs() @ w.abs().T
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs() / scale).max() < 1e-5


@pytest.mark.parametrize("weight_dtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_channel_matrix_vector_form_holds_its_precision_from_tiny_to_huge_inputs(
        weight_dtype, device):
    assert_channel_precision_from_tiny_to_huge_inputs(weight_dtype, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_dtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_channel_widening_holds_its_precision_when_compiled(weight_dtype):
    """The same on the GPU, where the widened int8 bytes are float32 denormals that compiled
    arithmetic must keep (no flush to zero)."""
    assert_channel_precision_from_tiny_to_huge_inputs(weight_dtype, "cuda")


@pytest.mark.parametrize("weight_dtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_channel_matrix_vector_form_widens_every_byte_exactly(weight_dtype, device):
    """The matrix-vector form widens one-byte weights in the kernel (kernels/quant_w8a16.py):
    with one-hot rows of x every output is one weight times its scale, which must equal
    torch's value of that byte bit for bit, for every int8 and e4m3 bit pattern."""
    n, k = 16, 64
    weight = every_byte_weight(n, k, weight_dtype, device)
    scales = torch.rand(n, generator=torch.Generator().manual_seed(5)).to(device) + 0.5
    expected = (weight.float() * scales[:, None]).T  # [K, N]: row k is one-hot x at k
    launch = {"block_n": 16, "block_k": 32, "split": 2, "num_warps": 2, "num_stages": 2,
              "prefetch": False}
    for first in range(0, k, 4):
        x = torch.zeros(4, k, device=device)
        x[torch.arange(4), first + torch.arange(4)] = 1.0
        for config in (None, launch):
            out = channel_matmul(x, weight, scales, launch=config)
            assert torch.equal(out, expected[first:first + 4]), (first, config)
