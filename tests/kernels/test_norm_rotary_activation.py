"""RMSNorm (+ residual), rotary (incl. Llama-3 scaled frequencies) and SiLU-and-mul against
their torch references and against Hugging Face transformers' Llama modules."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.rmsnorm import rms_norm, rms_norm_ref
from kernels.rotary import apply_rotary, apply_rotary_ref


@pytest.mark.parametrize("hidden", [64, 48])
def test_rms_norm_with_and_without_residual(hidden: int, device: str) -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(device)
    residual = torch.randn(5, hidden, generator=gen).to(device)
    weight = torch.randn(hidden, generator=gen).to(device)
    hf = llama.LlamaRMSNorm(hidden, eps=1e-5).to(device)
    hf.weight.data.copy_(weight)
    assert_close(rms_norm(x, weight, 1e-5), hf(x).detach())
    out, new_residual = rms_norm(x, weight, 1e-5, residual=residual)
    ref_out, ref_residual = rms_norm_ref(x, weight, 1e-5, residual=residual)
    assert torch.equal(new_residual, ref_residual)
    assert_close(out, ref_out)
    assert_close(out, hf(x + residual).detach())


def _llama3_cos_sin(rotary_dim: int, max_pos: int, device: str):
    """cos/sin caches built by transformers' own Llama-3 rope init (caller-side scaling)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=rotary_dim * 4, num_attention_heads=4, rope_theta=500000.0,
                         max_position_embeddings=max_pos,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos().to(device), freqs.sin().to(device)


def test_rotary_llama3_matches_transformers(device: str) -> None:
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    head_dim, max_pos = 16, 64
    cos, sin = _llama3_cos_sin(head_dim, max_pos, device)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(6, 4, head_dim, generator=gen).to(device)
    k = torch.randn(6, 2, head_dim, generator=gen).to(device)
    positions = torch.tensor([0, 1, 7, 30, 63, 2], device=device)
    full_cos = torch.cat([cos, cos], -1)[positions]  # HF layout; unsqueezed to [T, 1, D]
    full_sin = torch.cat([sin, sin], -1)[positions]
    hf_q, hf_k = llama.apply_rotary_pos_emb(q, k, full_cos, full_sin, unsqueeze_dim=1)
    apply_rotary(q, k, positions, cos, sin)
    assert_close(q, hf_q)
    assert_close(k, hf_k)


def test_rotary_partial_dim_leaves_tail_untouched(device: str) -> None:
    gen = torch.Generator().manual_seed(12)
    cos = torch.randn(10, 4, generator=gen).to(device)
    sin = torch.randn(10, 4, generator=gen).to(device)
    q = torch.randn(3, 2, 12, generator=gen).to(device)
    k = torch.randn(3, 1, 12, generator=gen).to(device)
    positions = torch.tensor([9, 0, 4], device=device)
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary(q, k, positions, cos, sin)
    apply_rotary_ref(q_ref, k_ref, positions, cos, sin)
    assert_close(q, q_ref)
    assert_close(k, k_ref)
    assert torch.equal(q[..., 8:], q_ref[..., 8:])


@pytest.mark.parametrize("inter", [40, 1100])
def test_silu_and_mul_matches_reference(inter: int, device: str) -> None:
    gen = torch.Generator().manual_seed(inter)
    x = torch.randn(3, 2 * inter, generator=gen).to(device)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x))
