"""Programmatic dependent launch: off where it cannot run, and on a Hopper GPU a chain of
dependent kernels gives the same bits with it as without it, eager and in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from kernels import pdl
from kernels.activation import silu_and_mul
from kernels.quant_w4a16 import w4a16_matmul
from kernels.quant_w8a16 import w8a16_matmul
from kernels.rmsnorm import rms_norm
from tests.kernels.test_quant_kernels import random_w4, random_w8


def test_pdl_is_off_on_cpu() -> None:
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.launch(torch.device("cpu")) == {"PDL": False}


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture
def pdl_switch(monkeypatch):
    """set(on): kernels launched after it use PDL or not (KVRELAY_PDL)."""
    def set_(on: bool) -> None:
        monkeypatch.setenv(pdl.ENV, "1" if on else "0")
        pdl._enabled.cache_clear()
    yield set_
    pdl._enabled.cache_clear()


def _layers(hidden: int, inter: int, count: int):
    out = []
    for i in range(count):
        out.append({
            "norm": (torch.rand(hidden, device="cuda") + 0.5).bfloat16(),
            "up": random_w4(hidden, 2 * inter, 128, "cuda", seed=i),
            "down": random_w8(inter, hidden, "cuda", seed=i),
        })
    return out


def _chain(x: torch.Tensor, layers) -> torch.Tensor:
    """Each kernel reads what the one before wrote, the split-K matmuls share their counters
    and partials with the matmuls before them: a kernel that ran ahead of its wait would read
    stale activations or counters."""
    residual = x
    h = x
    for i, layer in enumerate(layers):
        normed, residual = rms_norm(h, layer["norm"], 1e-5, residual)
        gate_up = w4a16_matmul(normed, *layer["up"], 128)
        if i % 2:  # the activation in the matmul's prologue, or its own kernel
            h = w8a16_matmul(gate_up, *layer["down"], gated=True)
        else:
            h = w8a16_matmul(silu_and_mul(gate_up), *layer["down"])
        h = h * 0.5  # a torch kernel (launched without PDL) between
    return rms_norm(h, layers[0]["norm"], 1e-5, residual)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a GPU of compute capability 9.0+")
@pytest.mark.parametrize("rows", [1, 4, 32])
def test_chain_same_bits_with_and_without_pdl_gpu(pdl_switch, rows) -> None:
    hidden, inter = 1024, 2048
    layers = _layers(hidden, inter, 6)
    x = torch.randn(rows, hidden, device="cuda").bfloat16()
    pdl_switch(False)
    want = [_chain(x, layers), _chain(-x, layers)]
    pdl_switch(True)
    assert pdl.enabled(x.device)
    assert torch.equal(_chain(x, layers), want[0])
    static_x = x.clone()
    _chain(static_x, layers)  # compiled before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(static_x, layers)
    for i in range(30):
        static_x.copy_(x if i % 2 == 0 else -x)
        graph.replay()
        assert torch.equal(out, want[i % 2]), f"replay {i}"
