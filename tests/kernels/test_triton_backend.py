"""The triton backend equals the torch reference backend through the AttentionBackend
interface: same outputs, same caches afterwards, for decode, verification, prefill chunks
after a cached prefix, and steps that mix them."""

from __future__ import annotations

import pytest
import torch
from paged_case import make_case, replace_nan_with_garbage, with_fp8_cache
from tolerances import assert_close

from kernels.rotary import apply_rotary
from workers.attention.backend import AttentionMetadata
from workers.attention.registry import get_attention_backend
from workers.attention.torch_backend import TorchAttentionBackend
from workers.attention.triton_backend import TritonAttentionBackend
from workers.model.rotary import RotaryEmbedding

STEPS = {  # (q_lens, seq_lens)
    "decode": ([1, 1, 1], [17, 3, 40]),
    "verify": ([4, 1, 3], [12, 30, 3]),
    "mixed_prefill_decode_verify": ([1, 12, 3, 20], [33, 30, 9, 20]),
}


def _step(q_lens, seq_lens, device: str, seed: int, fp8: bool = False):
    """Caches holding each sequence's context; the new tokens' k/v are cut out of the cache
    (their slots set to NaN) and handed to forward, which must write them back.

    Slots no sequence owns hold large finite garbage rather than NaN here: the torch
    reference multiplies padded keys by zero probabilities (NaN-safety of our kernels is
    tested in test_flash_prefill / test_paged_decode), and garbage that is read changes the
    output."""
    c = make_case(q_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=32, block_size=8,
                  dtype=torch.float32, device=device, seed=seed)
    replace_nan_with_garbage(c, seed)
    if fp8:
        c = with_fp8_cache(c, k_scale=0.5, v_scale=2.0)
    slots = []
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(c.block_tables[i, pos // 8]) * 8 + pos % 8)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    k_flat, v_flat = c.k_cache.view(-1, 2, 32), c.v_cache.view(-1, 2, 32)
    k, v = k_flat[slot_mapping].float(), v_flat[slot_mapping].float()
    if fp8:  # the new tokens' k/v as the model computes them: wider than their cache value
        k, v = k * c.k_scale + 1e-3, v * c.v_scale - 1e-3
    k_flat[slot_mapping] = float("nan")
    v_flat[slot_mapping] = float("nan")
    meta = AttentionMetadata(
        slot_mapping=slot_mapping, query_start_loc=c.cu_q, seq_lens=c.seq_lens,
        block_tables=c.block_tables, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=tuple(c.cu_q_host), seq_lens_host=tuple(seq_lens))
    return c, k, v, meta


@pytest.mark.parametrize("kv", ["model-dtype", "fp8"])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_triton_backend_equals_torch_backend(step: str, kv: str, device: str) -> None:
    """fp8: both quantize the new k/v bit-equally and dequantize the same cache."""
    c, k, v, meta = _step(*STEPS[step], device=device, seed=len(step), fp8=kv == "fp8")
    caches = {name: (c.k_cache.clone(), c.v_cache.clone()) for name in ("torch", "triton")}
    outs = {}
    for name, backend in (("torch", TorchAttentionBackend()), ("triton", TritonAttentionBackend())):
        outs[name] = backend.forward(c.q, k, v, *caches[name], meta, c.scale, c.k_scale,
                                     c.v_scale)
    assert_close(outs["triton"], outs["torch"])
    for ours, ref in zip(caches["triton"], caches["torch"], strict=True):
        assert torch.equal(ours.float().nan_to_num(7.0), ref.float().nan_to_num(7.0))


def test_registry_builds_the_triton_backend() -> None:
    backend = get_attention_backend("triton")
    assert isinstance(backend, TritonAttentionBackend) and backend.name == "triton"


@pytest.mark.parametrize("kv", ["model-dtype", "fp8"])
@pytest.mark.parametrize("step", ["decode", "mixed_prefill_decode_verify"])
def test_rope_in_the_cache_write_equals_rope_first(step: str, kv: str, device: str) -> None:
    """forward(rope=...) with q, k unrotated (FusedOps' path): the same output and caches, bit
    for bit, as rotating first and calling forward without it."""
    c, k, v, meta = _step(*STEPS[step], device=device, seed=len(step), fp8=kv == "fp8")
    cos, sin = RotaryEmbedding(32, 10000.0, None).cos_sin_cache(64)
    gen = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 64, (k.shape[0],), generator=gen).to(device)
    rope = (positions, cos.to(device), sin.to(device))
    backend = TritonAttentionBackend()
    q_first, k_first = c.q.clone(), k.clone()
    apply_rotary(q_first, k_first, *rope)
    caches = [(c.k_cache.clone(), c.v_cache.clone()) for _ in range(2)]
    want = backend.forward(q_first, k_first, v, *caches[0], meta, c.scale, c.k_scale,
                           c.v_scale)
    got = backend.forward(c.q.clone(), k, v, *caches[1], meta, c.scale, c.k_scale, c.v_scale,
                          rope=rope)
    assert torch.equal(got, want)
    for ours, ref in zip(caches[1], caches[0], strict=True):
        assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))
