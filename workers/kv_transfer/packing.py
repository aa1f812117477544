"""Gather a sequence's KV blocks into one contiguous buffer, and scatter it back. Bit-exact.

The buffer is `[plan layers, 2 (K, V), num_blocks, block_size, plan kv heads, head_dim]`, the
layout of kernels/kv_pack.py, so one transfer is one large message. On CUDA one Triton launch
moves every layer's K and V (kernels/kv_pack.py); elsewhere torch `index_select` /
`index_copy_` per layer (one place decides: `copy_path`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.kv_quant import index_view
from workers.device_copy import device_tensor
from workers.kv_transfer.layout import KVLayout, TransferPlan

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def packed_shape(layout: KVLayout, plan: TransferPlan, num_blocks: int) -> tuple[int, ...]:
    return (plan.num_layers, 2, num_blocks, layout.block_size, plan.num_kv_heads,
            layout.head_dim)


def pack(kv_caches: KVCaches, layout: KVLayout, plan: TransferPlan,
         block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Copies blocks `block_ids` of the plan's layers and kv heads into `out` (allocated on the
    caches' device when None) and returns it. On CUDA the copy is queued on the current
    stream; the caller synchronizes before the blocks may change."""
    caches = _planned_caches(kv_caches, layout, plan)
    heads = plan.local_heads(layout)
    device = caches[0][0].device
    ids = device_tensor(block_ids, torch.int64, device)
    shape = packed_shape(layout, plan, len(block_ids))
    if out is None:
        out = torch.empty(shape, dtype=caches[0][0].dtype, device=device)
    out = out.view(shape)
    if _use_kernels(caches[0][0]):
        from kernels.kv_pack import pack_kv_blocks

        return pack_kv_blocks(caches, ids, (heads.start, heads.stop), out=out)
    moved = index_view(out)
    for layer, (k_cache, v_cache) in enumerate(caches):
        for kv, cache in enumerate((k_cache, v_cache)):
            torch.index_select(_heads_view(index_view(cache), heads), 0, ids,
                               out=moved[layer, kv])
    return out


def unpack(buf: torch.Tensor, kv_caches: KVCaches, layout: KVLayout, plan: TransferPlan,
           block_ids: Sequence[int]) -> None:
    """Scatters a buffer made by `pack` (on any device, any flat dtype view) into blocks
    `block_ids` of the plan's layers and kv heads of `kv_caches`."""
    caches = _planned_caches(kv_caches, layout, plan)
    heads = plan.local_heads(layout)
    cache0 = caches[0][0]
    shape = packed_shape(layout, plan, len(block_ids))
    buf = buf.reshape(-1).view(cache0.dtype).view(shape)
    if buf.device != cache0.device:
        buf = buf.to(cache0.device, non_blocking=True)
    ids = device_tensor(block_ids, torch.int64, cache0.device)
    if _use_kernels(cache0):
        from kernels.kv_pack import unpack_kv_blocks

        unpack_kv_blocks(buf, caches, ids, (heads.start, heads.stop))
        return
    buf = index_view(buf)
    for layer, (k_cache, v_cache) in enumerate(caches):
        for kv, cache in enumerate((k_cache, v_cache)):
            _heads_view(index_view(cache), heads).index_copy_(0, ids, buf[layer, kv])


class CopyStream:
    """The side stream one pair's KV copies run on (CUDA), so they overlap the engine's compute
    instead of queueing behind it; on CPU every method is a no-op. Use as a context manager
    on the pair's thread: it also binds that thread to the caches' device (NCCL needs it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._context = None

    def __enter__(self) -> CopyStream:
        if self._stream is not None:
            torch.cuda.set_device(self.device)
            self._context = torch.cuda.stream(self._stream)
            self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None

    def wait_event(self, event) -> None:
        """Orders later copies after `event` (recorded on the engine's stream), if any."""
        if self._stream is not None and event is not None:
            self._stream.wait_event(event)

    def synchronize(self) -> None:
        """Returns once every copy queued so far is done: blocks may then be reused."""
        if self._stream is not None:
            self._stream.synchronize()


def record_event(device: torch.device):
    """An event on the caller's current CUDA stream (None on CPU): KV written before it is
    what a transfer queued now must read."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def as_bytes(buf: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view (wire format: NCCL, gloo and ZMQ all move bytes, whatever the dtype)."""
    return buf.reshape(-1).view(torch.uint8)


def _planned_caches(kv_caches: KVCaches, layout: KVLayout, plan: TransferPlan):
    layers = plan.local_layers(layout)
    if len(kv_caches) != layout.layer_end - layout.layer_start:
        raise ValueError(f"{len(kv_caches)} (K, V) caches for layout layers "
                         f"[{layout.layer_start}, {layout.layer_end})")
    return [kv_caches[i] for i in layers]


def _heads_view(cache: torch.Tensor, heads: slice) -> torch.Tensor:
    # A full-head slice keeps the tensor contiguous, so index ops take their fast path.
    return cache if heads == slice(0, cache.shape[2]) else cache[:, :, heads]


def copy_path(kv_caches: KVCaches) -> str:
    """Which code path `pack` / `unpack` take for these caches, in words (benchmarks print
    it, so a slow run says why)."""
    cache = kv_caches[0][0]
    if one_launch(kv_caches):
        return "triton kv_pack: one launch for all layers and K/V"
    return f"torch index_select/index_copy_ per layer and K/V ({cache.device.type})"


def one_launch(kv_caches: KVCaches) -> bool:
    """True when `pack` / `unpack` move every layer's K and V in one kernel launch."""
    return _use_kernels(kv_caches[0][0])


def _use_kernels(cache: torch.Tensor) -> bool:
    return cache.is_cuda and cache.is_contiguous()


