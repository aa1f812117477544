"""CUDA IPC path of KV transfer: two processes on one GPU (a prefill and a decode worker that
share it), as vLLM/NIXL and SGLang do.

The receiver exports CUDA IPC handles of its KV cache tensors (and of a small probe buffer)
in its HelloReply, once per pair; the sender opens them once per pair and, per transfer, copies its
blocks device-to-device straight into the reserved destination blocks (one gather + one scatter
per layer per K/V, no packing, no host hop). The ZMQ control socket still carries the header,
a 'ready' from the receiver (which then holds the reservation's lock so an abort cannot free
the blocks mid-copy), the sender's 'written' and the receiver's ack.

Handles are sent field by field with msgpack (bytes and ints, dtype as a string): no pickle on
the wire. They only mean something on the same host and GPU, so the handshake carries a host id
and the GPU's uuid and both ends refuse (HandshakeMismatch naming the field) when they differ.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from functools import cache
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from kernels.kv_quant import index_view
from workers.errors import HandshakeMismatch
from workers.kv_transfer.base import TransferHeader, TransferState
from workers.kv_transfer.layout import KVLayout, TransferPlan
from workers.kv_transfer.messages import Reply
from workers.kv_transfer.pair_state import ReceiverPair, SenderPair
from workers.kv_transfer.probe import measure_gbps
from workers.kv_transfer.transfer_table import TransferRecord, TransferTable
from workers.protocol import encode

PATH = "cuda_ipc"
"""The transport's name in configs, logs, `path(peer)` and PairReport."""

# Handshake fields that must match for handles to open, in the order a mismatch is reported.
_PLACE_FIELDS = ("device", "host_id", "gpu_uuid")
FALLBACK_FIELDS = (*_PLACE_FIELDS, "cuda_ipc_export")
"""Refusals after which a cuda_ipc sender uses zmq for that pair instead."""


@cache
def host_id() -> str:
    """This machine (and boot): IPC handles of another host or boot are meaningless here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def place(device: torch.device) -> dict[str, str]:
    """Where a pair end's caches live: {'device', 'host_id', 'gpu_uuid'} ('' uuid off CUDA)."""
    uuid = ""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        uuid = str(getattr(props, "uuid", "") or "")
        if not uuid:  # an older torch: the PCI address names the GPU on this host as well
            uuid = "pci:" + ":".join(str(getattr(props, f"pci_{part}_id", "?"))
                                     for part in ("domain", "bus", "device"))
    return {"device": device.type, "host_id": host_id(), "gpu_uuid": uuid}


def check_place(local: dict[str, Any], remote: dict[str, Any]) -> None:
    """Raises HandshakeMismatch naming the first of device/host/GPU on which the ends differ
    (both must be on CUDA, on the same host and the same physical GPU)."""
    for name in _PLACE_FIELDS:
        mine, theirs = local.get(name, ""), remote.get(name, "")
        if name == "device" and mine == theirs != "cuda":
            raise HandshakeMismatch(name, mine, "cuda")
        if mine != theirs:
            raise HandshakeMismatch(name, mine, theirs)


def encode_handle(args: tuple) -> dict[str, Any]:
    """`reduce_tensor(t)[1]` of a CUDA tensor -> msgpack-able fields (bytes, ints, strings)."""
    (_, size, stride, offset, _, dtype, device, handle, size_bytes, offset_bytes, _,
     ref_handle, ref_offset, event_handle, event_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": int(offset),
            "dtype": str(dtype).removeprefix("torch."), "device": int(device),
            "handle": bytes(handle), "size_bytes": int(size_bytes),
            "offset_bytes": int(offset_bytes), "ref_handle": bytes(ref_handle),
            "ref_offset": int(ref_offset),
            "event_handle": bytes(event_handle) if event_handle is not None else None,
            "event_sync": bool(event_sync)}


def decode_handle(fields: dict[str, Any], device_index: int) -> tuple:
    """The inverse of encode_handle: `rebuild_cuda_tensor`'s arguments, with the importer's own
    index of the (same, by uuid) GPU, since CUDA_VISIBLE_DEVICES may differ between them."""
    dtype = getattr(torch, fields["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {fields['dtype']!r}")
    return (torch.Tensor, torch.Size(fields["size"]), tuple(fields["stride"]), fields["offset"],
            torch.storage.TypedStorage, dtype, device_index, fields["handle"],
            fields["size_bytes"], fields["offset_bytes"], False, fields["ref_handle"],
            fields["ref_offset"], fields["event_handle"], fields["event_sync"])


def export_tensor(t: torch.Tensor) -> dict[str, Any]:
    return encode_handle(reduce_tensor(t)[1])


def open_tensor(fields: dict[str, Any], device: torch.device) -> torch.Tensor:
    t = rebuild_cuda_tensor(*decode_handle(fields, device.index or 0))
    if list(t.shape) != fields["size"]:
        raise ValueError(f"opened IPC tensor has shape {list(t.shape)}, not {fields['size']}")
    return t


class IpcExport:
    """Receiver side: exports handles of its caches to each cuda_ipc sender that shakes hands,
    and keeps one inbox per sender identity for its 'written' messages."""

    def __init__(self, kv_caches, device: torch.device, probe_bytes: int):
        self.kv_caches = kv_caches
        self.device = device
        self.probe_bytes = probe_bytes
        self.place = place(device) if device.type == "cuda" else {
            "device": device.type, "host_id": host_id(), "gpu_uuid": ""}
        self._probe: torch.Tensor | None = None  # kept alive: the sender writes into it
        self._inboxes: dict[bytes, queue.Queue] = {}

    def accept(self, sender_place: dict[str, Any]) -> dict[str, Any]:
        """The HelloReply.ipc of a sender at `sender_place`; raises HandshakeMismatch.

        Exported afresh for every handshake, as torch does for every put of a tensor on a
        queue: each export carries its own ref counter, which its one importer releases."""
        check_place(self.place, sender_place)
        try:
            return self._build()
        except (RuntimeError, ValueError) as err:  # refused by name so the sender falls back
            raise HandshakeMismatch("cuda_ipc_export", repr(err), "") from err

    def _build(self) -> dict[str, Any]:
        with torch.cuda.device(self.device):  # the control thread's device may differ
            caches = [[export_tensor(k), export_tensor(v)] for k, v in self.kv_caches]
            probe = None
            if self.probe_bytes > 0:
                if self._probe is None:
                    self._probe = torch.empty(self.probe_bytes, dtype=torch.uint8,
                                              device=self.device)
                probe = export_tensor(self._probe)
        return {**self.place, "caches": caches, "probe": probe}

    def deliver(self, identity: bytes, msg: Reply) -> None:
        """Control thread: a sender's 'written' message."""
        self._inboxes.setdefault(identity, queue.Queue()).put(msg)

    def await_written(self, identity: bytes, request_id: str, deadline: float) -> Reply | None:
        """The sender's 'written' for `request_id` (older ones are dropped), None at deadline."""
        inbox = self._inboxes.setdefault(identity, queue.Queue())
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = inbox.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            if msg.request_id == request_id:
                return msg
        return None

    def forget(self, identity: bytes) -> None:
        self._inboxes.pop(identity, None)


class IpcPeer:
    """Sender side: the receiver's caches opened from its handles, for one pair's lifetime."""

    def __init__(self, info: dict[str, Any], device: torch.device, layout: KVLayout):
        check_place(place(device), info)
        self.device = device
        self.caches = [(open_tensor(k, device), open_tensor(v, device))
                       for k, v in info["caches"]]
        self.probe_buf = open_tensor(info["probe"], device) if info.get("probe") else None
        self.layout = layout
        """The receiver's layout (which layers and heads `caches` hold)."""

    def copy(self, src_caches, src_layout: KVLayout, plan: TransferPlan,
             src_ids: list[int], dst_ids: list[int]) -> None:
        """Enqueues the plan's blocks into the receiver's caches (the caller syncs)."""
        copy_blocks(src_caches, src_layout, self.caches, self.layout, plan, src_ids, dst_ids)

    def probe(self, rounds: int) -> float | None:
        """GB/s of a device-to-device copy into the receiver's probe buffer."""
        if self.probe_buf is None:
            return None
        src = torch.zeros_like(self.probe_buf)

        def one_round(_: int) -> None:
            self.probe_buf.copy_(src)
            torch.cuda.current_stream(self.device).synchronize()

        return measure_gbps(one_round, src.numel(), rounds)


class IpcSending:
    """Sender half (WholeSending): the header; the receiver's 'ready' (it now holds the
    reservation); the copy straight into its blocks; 'written'; its final ack (or refusal)."""

    path = PATH

    def __init__(self, peer: IpcPeer, layout: KVLayout, kv_caches, closed: threading.Event):
        self.peer = peer
        self.layout = layout
        self.kv_caches = kv_caches
        self._closed = closed

    def push(self, pair: SenderPair, plan: TransferPlan, record: TransferRecord,
             header: TransferHeader, ready) -> Reply:
        pair.sock.send(encode(header))
        reply = pair.expect(Reply, record.deadline, self._closed, header.request_id)
        if not reply.ok or reply.kind != "ready":
            return reply
        ok, reason = True, ""
        with record.busy:
            if record.state.terminal:
                ok, reason = False, f"transfer {record.state.value}"
            else:
                try:
                    pair.stream.wait_event(ready)
                    self.peer.copy(self.kv_caches, self.layout, plan, record.block_ids,
                                   header.dest_block_ids[:header.num_blocks])
                    pair.stream.synchronize()  # in place before the receiver marks DONE
                except Exception as err:  # noqa: BLE001 - any copy error: FAILED on both ends
                    ok, reason = False, f"{type(err).__name__}: {err}"
        pair.sock.send(encode(Reply(header.request_id, "written", ok, reason)))
        return pair.expect(Reply, record.deadline, self._closed, header.request_id)

    def probe(self, pair: SenderPair, bytes_: int, rounds: int, deadline: float) -> float | None:
        return self.peer.probe(rounds)


class IpcReceiving:
    """Receiver half (WholeReceiving): the sender copies into the blocks itself. This end holds
    the reservation's lock from 'ready' until the sender's 'written' (or the deadline), so an
    abort waits for the copy instead of freeing blocks that are being written."""

    def __init__(self, export: IpcExport, table: TransferTable, reply):
        self.export = export
        self.table = table
        self._reply = reply

    def receive(self, peer: ReceiverPair, record: TransferRecord, header: TransferHeader,
                plan: TransferPlan, frame) -> None:
        rid, start = header.request_id, time.perf_counter()
        with record.busy:
            if record.state.terminal:
                self._reply(peer.identity, Reply(rid, "ack", False,
                                                 f"transfer {record.state.value}"))
                return
            self._reply(peer.identity, Reply(rid, "ready"))
            written = self.export.await_written(peer.identity, rid, record.deadline)
            if written is not None and written.ok and not record.state.terminal:
                self.table.add_part(rid, plan, plan.num_cells, header.num_bytes,
                                    time.perf_counter() - start, header.extra)
                self._reply(peer.identity, Reply(rid, "ack"))
                return
            if written is None:
                reason = "no 'written' from the sender before the deadline"
            else:
                reason = f"sender's copy failed: {written.reason}" if not written.ok else \
                    f"transfer {record.state.value}"
            # The deadline's own FAILED (TransferTimeout) wins if it already fired.
            self.table.finish(rid, TransferState.FAILED, reason)
        self._reply(peer.identity, Reply(rid, "ack", False, reason))


def copy_blocks(src_caches, src_layout: KVLayout, dst_caches, dst_layout: KVLayout,
                plan: TransferPlan, src_ids: list[int], dst_ids: list[int]) -> None:
    """dst block dst_ids[i] <- src block src_ids[i] for the plan's layers and kv heads, on the
    current stream: one gather and one scatter per layer per K/V, no packed buffer."""
    device = dst_caches[0][0].device
    src_index = torch.tensor(src_ids, dtype=torch.long, device=device)
    dst_index = torch.tensor(dst_ids, dtype=torch.long, device=device)
    src_heads, dst_heads = plan.local_heads(src_layout), plan.local_heads(dst_layout)
    whole = (src_heads == slice(0, src_caches[0][0].shape[2])
             and dst_heads == slice(0, dst_caches[0][0].shape[2]))
    for s, d in zip(plan.local_layers(src_layout), plan.local_layers(dst_layout), strict=True):
        for src, dst in zip(map(index_view, src_caches[s]), map(index_view, dst_caches[d]),
                            strict=True):
            picked = src.index_select(0, src_index)
            if whole:
                dst.index_copy_(0, dst_index, picked)
            else:  # a TP slice: write only the plan's heads (a strided view of dst)
                dst[:, :, dst_heads].index_copy_(0, dst_index, picked[:, :, src_heads])
