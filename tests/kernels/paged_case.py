"""Random paged-attention inputs for kernel tests: ragged sequences in shuffled blocks.

Block 0, every block no sequence owns, and every slot past a sequence's end hold NaN, so a
kernel that reads a wrong block or an unmasked slot produces NaN and fails the comparison.
Block tables are padded with 0 (the runner's convention), i.e. with a NaN block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels.flash_prefill import flash_prefill, flash_prefill_ref
from kernels.kv_quant import quantize_kv
from kernels.paged_decode import paged_decode, paged_decode_ref


@dataclass(frozen=True)
class PagedCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32
    cu_q: torch.Tensor  # int32
    seq_lens: torch.Tensor  # int32
    cu_q_host: list[int]
    seq_lens_host: list[int]
    scale: float
    k_scale: torch.Tensor | None = None  # fp8 caches only
    v_scale: torch.Tensor | None = None

    @property
    def max_q_len(self) -> int:
        return max(b - a for a, b in zip(self.cu_q_host, self.cu_q_host[1:], strict=False))


def make_case(
    q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, device: str, seed: int, spare_blocks: int = 3,
) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    owned = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros((len(seq_lens), max(blocks_per_seq) + 1), dtype=torch.int32)
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    for i, (seq_len, count) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        ids, owned = owned[:count], owned[count:]
        table[i, :count] = torch.tensor(ids, dtype=torch.int32)
        pos = torch.arange(seq_len)
        slots = table[i, pos // block_size].long() * block_size + pos % block_size
        flat_k[slots] = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        flat_v[slots] = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
    cu_q = [0]
    for q_len in q_lens:
        cu_q.append(cu_q[-1] + q_len)
    q = torch.randn(cu_q[-1], num_heads, head_dim, generator=gen).to(dtype)
    return PagedCase(
        q=q.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
        block_tables=table.to(device),
        cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cu_q_host=cu_q, seq_lens_host=list(seq_lens), scale=head_dim ** -0.5,
    )


def with_fp8_cache(c: PagedCase, k_scale: float, v_scale: float) -> PagedCase:
    """The case with its caches quantized to fp8 (NaN slots stay NaN) under these scales."""
    scales = [torch.tensor([s], dtype=torch.float32, device=c.q.device)
              for s in (k_scale, v_scale)]
    return replace(c, k_cache=quantize_kv(c.k_cache, scales[0]),
                   v_cache=quantize_kv(c.v_cache, scales[1]), k_scale=scales[0],
                   v_scale=scales[1])


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def run_prefill(c: PagedCase, **kernel_args) -> torch.Tensor:
    """`flash_prefill` of the case into a NaN-poisoned output (rows it skips stay NaN)."""
    out = poisoned_like(c.q)
    flash_prefill(c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_q, c.seq_lens,
                  c.max_q_len, c.scale, out=out, k_scale=c.k_scale, v_scale=c.v_scale,
                  **kernel_args)
    return out


def prefill_ref(c: PagedCase) -> torch.Tensor:
    return flash_prefill_ref(c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_q_host,
                             c.seq_lens_host, c.scale, c.k_scale, c.v_scale)


def run_decode(c: PagedCase, max_q_len: int, num_splits: int | None,
               tree_masks: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_decode` of the case into a NaN-poisoned output."""
    out = poisoned_like(c.q)
    paged_decode(c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_q, c.seq_lens,
                 max(c.seq_lens_host), c.scale, max_q_len=max_q_len, out=out,
                 num_splits=num_splits, k_scale=c.k_scale, v_scale=c.v_scale,
                 tree_masks=tree_masks)
    return out


def decode_ref(c: PagedCase, tree_masks: torch.Tensor | None = None) -> torch.Tensor:
    return paged_decode_ref(c.q, c.k_cache, c.v_cache, c.block_tables, c.cu_q_host,
                            c.seq_lens_host, c.scale, c.k_scale, c.v_scale, tree_masks)


def replace_nan_with_garbage(case: PagedCase, seed: int) -> None:
    """Unowned slots get large finite random values instead of NaN (for references that
    multiply padded keys by zero probabilities); any read of them still changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    for cache in (case.k_cache, case.v_cache):
        garbage = (torch.randn(cache.shape, generator=gen) * 100).to(cache.dtype)
        torch.where(cache.isnan(), garbage.to(cache.device), cache, out=cache)
