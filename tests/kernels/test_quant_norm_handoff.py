"""The RMSNorm finished across two matrix-vector matmuls (kernels/norm_handoff.py `AddNorm`,
`NormedRows`): the producer's epilogue adds the residual with kernels/rmsnorm.py's rounding and
hands on h * weight and its squares; the consumer scales its sums by rstd. Against the norm
kernel's references, for W4A16, int8 and FP8 weights; small shapes on CPU under
TRITON_INTERPRET=1, Llama-3-8B's o -> gate/up in bfloat16 on the GPU."""

from __future__ import annotations

import pytest
import torch
import triton

from kernels.norm_handoff import AddNorm, NormedRows
from kernels.quant_fp8 import FP8, fp8_linear, fp8_linear_ref
from kernels.quant_split_k import GEMV_MAX_ROWS
from kernels.quant_w4a16 import w4a16_matmul, w4a16_matmul_ref
from kernels.quant_w8a16 import channel_matmul, w8a16_matmul, w8a16_matmul_ref
from kernels.rmsnorm import rms_norm, rms_norm_ref
from tests.kernels.test_quant_kernels import random_w4, random_w8, random_x
from tests.kernels.tolerances import assert_close

GROUP = 32
EPS = 1e-5


def random_weight(fmt: str, k: int, n: int, device: str, seed: int):
    if fmt == "w4a16":
        return random_w4(k, n, GROUP, device, seed)
    qweight, scales = random_w8(k, n, device, seed)
    if fmt == "fp8":
        generator = torch.Generator().manual_seed(seed)
        qweight = (torch.randn(n, k, generator=generator) * 100).clamp(-448, 448).to(FP8)
        qweight = qweight.to(device)
    return qweight, scales


def matmul(fmt: str, x, weight, **kwargs):
    if fmt == "w4a16":
        return w4a16_matmul(x, *weight, GROUP, **kwargs)
    if fmt == "int8":
        return w8a16_matmul(x, *weight, **kwargs)
    if kwargs.get("launch") is not None:  # fp8_linear's weight-only rows, with a launch
        return channel_matmul(x, *weight, **kwargs)
    kwargs.pop("launch", None)
    return fp8_linear(x, *weight, **kwargs)


def matmul_ref(fmt: str, x, weight):
    if fmt == "w4a16":
        return w4a16_matmul_ref(x, *weight, GROUP)
    if fmt == "int8":
        return w8a16_matmul_ref(x, *weight)
    return fp8_linear_ref(x, *weight)


def norm_case(m: int, n: int, dtype: torch.dtype, device: str):
    generator = torch.Generator().manual_seed(7)
    residual = (torch.randn(m, n, generator=generator) * 4).to(dtype).to(device)
    weight = (torch.rand(n, generator=generator) + 0.5).to(dtype).to(device)
    return residual, weight


def handed_form_ref(fmt: str, h: torch.Tensor, norm_weight: torch.Tensor, weight):
    """The handed form's math in float32: rstd (round(h w) @ W), rounded once at the end."""
    scaled = (h.float() * norm_weight.float()).to(h.dtype).float()
    rstd = torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + EPS)
    return (matmul_ref(fmt, scaled, weight) * rstd).to(h.dtype)


FORMATS = ["w4a16", "int8", "fp8"]
# N = 352 is 11 column tiles of 32 (W4A16's default) and 22 of 16 (the channel kernel's);
# 64-column tiles leave the last one half masked.


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,launch", [(1, None), (3, {"block_n": 64})], ids=["default", "masked"])
def test_epilogue_adds_the_residual_as_the_norm_kernel_does_and_hands_on_its_squares(
    fmt, dtype, m, launch, device
):
    k, n = 256, 352
    weight = random_weight(fmt, k, n, device, seed=1)
    x = random_x(m, k, dtype, device)
    residual, norm_weight = norm_case(m, n, dtype, device)
    plain = matmul(fmt, x, weight, launch=launch)
    handed, h = matmul(fmt, x, weight, launch=launch,
                       add_norm=AddNorm(residual, norm_weight, EPS))
    assert isinstance(handed, NormedRows) and handed.dtype == dtype and handed.eps == EPS
    # The same bits as the matmul alone, then kernels/rmsnorm.py's residual add.
    assert torch.equal(h, (plain.float() + residual.float()).to(dtype))
    assert torch.equal(handed.scaled, (h.float() * norm_weight.float()).to(dtype))
    block_n = (launch or {}).get("block_n", 32 if fmt == "w4a16" else 16)
    assert handed.square_parts.shape == (m, triton.cdiv(n, block_n))
    torch.testing.assert_close(handed.square_parts.sum(1), h.float().pow(2).sum(1),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("producer,consumer,dtype", [
    *((p, c, torch.float16) for p in FORMATS for c in FORMATS),
    *((f, f, torch.float32) for f in FORMATS),
])
def test_consumer_of_handed_rows_matches_the_norm_then_the_matmul(producer, consumer, dtype,
                                                                 device):
    """o -> norm -> gate/up in miniature: h is the norm reference's residual add, and the
    consumer's output the handed form's reference (`handed_form_ref`)."""
    m, k, n, n2 = 3, 256, 352, 96
    first = random_weight(producer, k, n, device, seed=2)
    second = random_weight(consumer, n, n2, device, seed=3)
    x = random_x(m, k, dtype, device)
    residual, norm_weight = norm_case(m, n, dtype, device)
    handed, h = matmul(producer, x, first, add_norm=AddNorm(residual, norm_weight, EPS))
    out = matmul(consumer, handed, second)
    assert out.dtype == dtype and out.shape == (m, n2)
    y = matmul_ref(producer, x, first)
    normed, h_ref = rms_norm_ref(y, norm_weight, EPS, residual)
    torch.testing.assert_close(h.float(), h_ref.float(), rtol=1e-3 if dtype != torch.float32
                               else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-4)
    # From the kernel's own h: the handed form's math, up to the summation order; and the
    # norm's reference then the matmul, up to the roundings of the normed input.
    assert_close(out, handed_form_ref(consumer, h, norm_weight, second))
    unfused = matmul_ref(consumer, rms_norm_ref(h, norm_weight, EPS), second)
    torch.testing.assert_close(out.float(), unfused.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_the_matrix_vector_form_does_not_take_are_refused(fmt, device):
    m = GEMV_MAX_ROWS + 1
    weight = random_weight(fmt, 64, 64, device, seed=4)
    residual, norm_weight = norm_case(m, 64, torch.float32, device)
    with pytest.raises(AssertionError, match="no norm fusion"):
        matmul(fmt, random_x(m, 64, torch.float32, device), weight,
               add_norm=AddNorm(residual, norm_weight, EPS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 4])
def test_o_then_gate_up_at_llama3_8b_shapes_in_bfloat16(fmt, m):
    """Llama-3-8B's o projection handing the post-attention norm to gate/up, with PDL and in a
    CUDA graph: h is the norm kernel's residual add bit for bit, and gate/up's output is
    within bfloat16's tolerance of its float32 reference. (Against the norm kernel's output,
    rounded twice to bfloat16 before the 4096-long product, the differences are the size of
    those roundings: up to 4 bfloat16 steps at these shapes.)"""
    device, dtype = "cuda", torch.bfloat16
    o_weight = random_weight(fmt, 4096, 4096, device, seed=5)
    gate_up = random_weight(fmt, 4096, 28672, device, seed=6)
    x = random_x(m, 4096, dtype, device) * 0.05
    residual, norm_weight = norm_case(m, 4096, dtype, device)

    def fused():
        handed, h = matmul(fmt, x, o_weight, add_norm=AddNorm(residual, norm_weight, EPS))
        return matmul(fmt, handed, gate_up), h

    out, h = fused()
    assert torch.equal(h, rms_norm(matmul(fmt, x, o_weight), norm_weight, EPS, residual)[1])
    assert_close(out, handed_form_ref(fmt, h, norm_weight, gate_up))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        replayed = fused()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed[0], out) and torch.equal(replayed[1], h)
