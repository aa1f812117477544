"""Pack / unpack a sequence's KV blocks for transfer.

`pack_kv_blocks` gathers the given blocks of the given layers' K and V caches (and a contiguous
range of kv heads, for TP slices) into one contiguous buffer
`[num_layers, 2, num_blocks, block_size, num_heads, head_dim]` (2 = K, V), so a transfer is one
large message. `unpack_kv_blocks` scatters such a buffer back into (other) block ids. Layer
selection is the caller's list of (K, V) caches. Pure data movement: exact equality with the
torch reference.

Speed: ONE launch moves every layer's K and V. The kernel reads each cache's address from a
device table of data pointers (built once per set of caches and cached), so there is no
per-layer launch and no host work between layers; a program copies one (layer, K/V, block)
with 2-D tiles of whole rows (a slot's selected heads are `heads * head_dim` contiguous
elements), which compile to 16-byte vector loads and stores when the addresses allow it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

KVCache = tuple[torch.Tensor, torch.Tensor]
# Bytes one program moves per loop step: 16 KiB over 4 warps is 8 vector loads of 16 B in
# flight per thread; at the ~48 registers this takes (ptxas, sm_90) 10 programs fit an SM,
# ~160 KiB in flight per SM, several times what HBM latency x bandwidth needs.
_TILE_BYTES = 16384
_NUM_WARPS = 4
# Pointer tables of recently used cache sets, keyed by each cache's (data pointer, shape): a
# table's content is a function of its key, so a reused address never makes it stale, and a
# cache of another shape at a known address is a new key, checked again. A receiver meets one
# layer range per chunk size, so keep a few dozen.
_TABLES: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
_MAX_TABLES = 64


@triton.jit
def _kv_copy_kernel(
    table_ptr, cache0_ptr, buf_ptr, block_ids_ptr, num_blocks,
    stride_block, stride_slot, head_offset,
    BLOCK_SIZE: tl.constexpr, ROW: tl.constexpr, ROW_P2: tl.constexpr, SLOTS: tl.constexpr,
    PTR_ALIGN: tl.constexpr, TO_BUFFER: tl.constexpr,
):
    # Program (i, c): block block_ids[i] of cache c (c = 2 * layer + kv), one row per slot.
    i = tl.program_id(0)
    c = tl.program_id(1)
    # The address table is int64; the hint restores the alignment a loaded value loses,
    # which the vectorizer needs (checked on the host when the table is built).
    cache_ptr = tl.multiple_of(tl.load(table_ptr + c).to(cache0_ptr.dtype, bitcast=True),
                               PTR_ALIGN)
    block = tl.load(block_ids_ptr + i).to(tl.int64)
    cache_block = cache_ptr + block * stride_block + head_offset
    buf_block = buf_ptr + (c.to(tl.int64) * num_blocks + i) * (BLOCK_SIZE * ROW)
    cols = tl.arange(0, ROW_P2)
    for first in tl.static_range(0, BLOCK_SIZE, SLOTS):
        slots = first + tl.arange(0, SLOTS)
        mask = (slots[:, None] < BLOCK_SIZE) & (cols[None, :] < ROW)
        cache_at = cache_block + slots[:, None] * stride_slot + cols[None, :]
        buf_at = buf_block + slots[:, None] * ROW + cols[None, :]
        if TO_BUFFER:
            tl.store(buf_at, tl.load(cache_at, mask=mask), mask=mask)
        else:
            tl.store(cache_at, tl.load(buf_at, mask=mask), mask=mask)


def packed_shape(caches: Sequence[KVCache], num_blocks: int, heads: tuple[int, int]) -> tuple:
    """Shape of the buffer `pack_kv_blocks` fills."""
    _, block_size, _, head_dim = caches[0][0].shape
    return (len(caches), 2, num_blocks, block_size, heads[1] - heads[0], head_dim)


def _pointer_table(caches: Sequence[KVCache]) -> tuple[torch.Tensor, int]:
    """(int64 device tensor of the K0, V0, K1, V1, ... data pointers, their common byte
    alignment up to 16). Checks the caches when it builds a table; cached per pointer set."""
    flat = [cache for pair in caches for cache in pair]
    first = flat[0]
    # Built on every call: maps over C methods cost a third of a generator's time.
    key = (first.device, first.dtype, *map(torch.Tensor.data_ptr, flat),
           *map(torch.Tensor.size, flat))
    if key not in _TABLES:
        for cache in flat:
            assert cache.shape == first.shape, f"cache shapes {tuple(cache.shape)} vs " \
                f"{tuple(first.shape)}"
            assert cache.is_contiguous(), "caches must be contiguous"
            assert cache.dtype == first.dtype, f"cache dtypes {cache.dtype} vs {first.dtype}"
            assert cache.device == first.device, f"{cache.device} vs {first.device}"
        pointers = key[2:2 + len(flat)]
        table = torch.tensor(pointers, dtype=torch.int64).to(first.device)
        _TABLES[key] = table, math.gcd(16, *pointers)
        if len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    _TABLES.move_to_end(key)
    table, align = _TABLES[key]
    if table.is_cuda:
        # This launch may run on another stream than the table was made on: once evicted,
        # its memory must not be reused before this launch is done reading it.
        table.record_stream(torch.cuda.current_stream(table.device))
    return table, align


def _check(caches: Sequence[KVCache], block_ids: torch.Tensor, heads: tuple[int, int], buf):
    assert len(caches) > 0, "no layers selected"
    cache = caches[0][0]
    assert cache.dtype == buf.dtype, f"cache {cache.dtype} vs buffer {buf.dtype}"
    assert 0 <= heads[0] < heads[1] <= cache.shape[2], f"heads {heads} of {cache.shape[2]}"
    assert block_ids.dim() == 1 and not block_ids.is_floating_point(), "block_ids: 1-D int"
    assert block_ids.device == cache.device, f"block_ids on {block_ids.device}"
    want = packed_shape(caches, block_ids.numel(), heads)
    assert tuple(buf.shape) == want and buf.is_contiguous(), f"buffer {tuple(buf.shape)} != {want}"


def _copy(caches, block_ids, heads, buf, to_buffer: bool) -> None:
    _check(caches, block_ids, heads, buf)
    table, ptr_align = _pointer_table(caches)
    cache = caches[0][0]
    _, block_size, _, head_dim = cache.shape
    row = (heads[1] - heads[0]) * head_dim
    row_p2 = triton.next_power_of_2(row)
    tile = _TILE_BYTES // cache.element_size()
    slots = min(triton.next_power_of_2(block_size), max(1, tile // row_p2))
    if block_ids.numel() == 0:
        return
    _kv_copy_kernel[(block_ids.numel(), table.numel())](
        table, cache, buf, block_ids, block_ids.numel(),
        cache.stride(0), cache.stride(1), heads[0] * head_dim,
        BLOCK_SIZE=block_size, ROW=row, ROW_P2=row_p2, SLOTS=slots,
        PTR_ALIGN=ptr_align, TO_BUFFER=to_buffer, num_warps=_NUM_WARPS,
    )


def pack_kv_blocks(
    caches: Sequence[KVCache],
    block_ids: torch.Tensor,
    heads: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather blocks `block_ids` of every (K, V) in `caches`, kv heads [heads[0], heads[1]),
    into a contiguous buffer (see `packed_shape`); returns it (`out` if given). One kernel
    launch, queued on the current stream; `block_ids` must be on the caches' device."""
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
    """Scatter a buffer made by `pack_kv_blocks` into blocks `block_ids` of `caches` (one
    launch, current stream). Block ids must be distinct; other blocks are untouched."""
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
