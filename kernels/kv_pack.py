"""Pack / unpack a sequence's KV blocks for transfer.

`pack_kv_blocks` gathers the given blocks of the given layers' K and V caches (and a contiguous
range of kv heads, for TP slices) into one contiguous buffer
`[num_layers, 2, num_blocks, block_size, num_heads, head_dim]` (2 = K, V), so a transfer is one
large message. `unpack_kv_blocks` scatters such a buffer back into (other) block ids. Layer
selection is the caller's list of (K, V) caches. Pure data movement: exact equality with the
torch reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

KVCache = tuple[torch.Tensor, torch.Tensor]
_BLOCK = 1024


@triton.jit
def _block_copy_kernel(
    cache_ptr, buf_ptr, block_ids_ptr,
    stride_cb, stride_cs, head_offset,
    row_elems, block_elems,
    TO_BUFFER: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    block = tl.load(block_ids_ptr + i).to(tl.int64)
    e = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = e < block_elems
    # A block's selected heads are one contiguous row of row_elems per slot.
    cache_off = block * stride_cb + (e // row_elems) * stride_cs + head_offset + e % row_elems
    buf_off = i.to(tl.int64) * block_elems + e
    if TO_BUFFER:
        tl.store(buf_ptr + buf_off, tl.load(cache_ptr + cache_off, mask=mask), mask=mask)
    else:
        tl.store(cache_ptr + cache_off, tl.load(buf_ptr + buf_off, mask=mask), mask=mask)


def packed_shape(caches: Sequence[KVCache], num_blocks: int, heads: tuple[int, int]) -> tuple:
    """Shape of the buffer `pack_kv_blocks` fills."""
    _, block_size, _, head_dim = caches[0][0].shape
    return (len(caches), 2, num_blocks, block_size, heads[1] - heads[0], head_dim)


def _check(caches: Sequence[KVCache], block_ids: torch.Tensor, heads: tuple[int, int], buf):
    assert len(caches) > 0, "no layers selected"
    shape = caches[0][0].shape
    for k_cache, v_cache in caches:
        assert k_cache.shape == shape and v_cache.shape == shape, f"cache shapes {shape}"
        assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
        assert k_cache.dtype == v_cache.dtype == buf.dtype, f"{k_cache.dtype} vs {buf.dtype}"
    assert 0 <= heads[0] < heads[1] <= shape[2], f"heads {heads} of {shape[2]}"
    assert block_ids.dim() == 1 and not block_ids.is_floating_point(), "block_ids: 1-D int"
    want = packed_shape(caches, block_ids.numel(), heads)
    assert tuple(buf.shape) == want and buf.is_contiguous(), f"buffer {tuple(buf.shape)} != {want}"


def _copy(caches, block_ids, heads, buf, to_buffer: bool) -> None:
    _check(caches, block_ids, heads, buf)
    _, block_size, _, head_dim = caches[0][0].shape
    row_elems = (heads[1] - heads[0]) * head_dim
    block_elems = block_size * row_elems
    if block_ids.numel() == 0:
        return
    grid = (block_ids.numel(), triton.cdiv(block_elems, _BLOCK))
    for layer, (k_cache, v_cache) in enumerate(caches):
        for kv, cache in enumerate((k_cache, v_cache)):
            _block_copy_kernel[grid](
                cache, buf[layer, kv], block_ids,
                cache.stride(0), cache.stride(1), heads[0] * head_dim,
                row_elems, block_elems,
                TO_BUFFER=to_buffer, BLOCK=_BLOCK,
            )


def pack_kv_blocks(
    caches: Sequence[KVCache],
    block_ids: torch.Tensor,
    heads: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather blocks `block_ids` of every (K, V) in `caches`, kv heads [heads[0], heads[1]),
    into a contiguous buffer (see `packed_shape`); returns it (`out` if given)."""
    heads = heads or (0, caches[0][0].shape[2])
    if out is None:
        shape = packed_shape(caches, block_ids.numel(), heads)
        out = torch.empty(shape, dtype=caches[0][0].dtype, device=caches[0][0].device)
    _copy(caches, block_ids, heads, out, to_buffer=True)
    return out


def unpack_kv_blocks(
    buf: torch.Tensor,
    caches: Sequence[KVCache],
    block_ids: torch.Tensor,
    heads: tuple[int, int] | None = None,
) -> None:
    """Scatter a buffer made by `pack_kv_blocks` into blocks `block_ids` of `caches`."""
    heads = heads or (0, caches[0][0].shape[2])
    _copy(caches, block_ids, heads, buf, to_buffer=False)


def pack_kv_blocks_ref(caches, block_ids, heads=None) -> torch.Tensor:
    """Plain-torch reference of `pack_kv_blocks`."""
    heads = heads or (0, caches[0][0].shape[2])
    ids = block_ids.long()
    return torch.stack([
        torch.stack([c[ids][:, :, heads[0]:heads[1]] for c in (k_cache, v_cache)])
        for k_cache, v_cache in caches
    ]).contiguous()


def unpack_kv_blocks_ref(buf, caches, block_ids, heads=None) -> None:
    """Plain-torch reference of `unpack_kv_blocks`."""
    heads = heads or (0, caches[0][0].shape[2])
    ids = block_ids.long()
    for layer, (k_cache, v_cache) in enumerate(caches):
        k_cache[ids, :, heads[0]:heads[1]] = buf[layer, 0]
        v_cache[ids, :, heads[0]:heads[1]] = buf[layer, 1]
