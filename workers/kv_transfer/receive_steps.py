"""One transfer on the decode side: check the header, then take the data on the pair's thread.

The per-transfer half of `Receiver` (workers/kv_transfer/receiver.py), which keeps the control
loop, the handshake and the pairs' lifecycle. `ReceiveSteps` is a mixin: it reads Receiver's
`layout`, `kv_caches`, `config`, `device`, `table`, `_peers` and `_ipc`, and calls its `_reply`
and `_close_group`.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch

from workers.kv_transfer.base import TransferHeader, TransferState
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.cuda_ipc import PATH as IPC_PATH
from workers.kv_transfer.cuda_ipc import IpcExport
from workers.kv_transfer.layout import KVLayout, TransferPlan, plan_transfer
from workers.kv_transfer.messages import Reply
from workers.kv_transfer.packing import CopyStream, KVCaches, unpack
from workers.kv_transfer.pair_state import ReceiverPair
from workers.kv_transfer.transfer_table import TransferRecord, TransferTable

log = logging.getLogger(__name__)


class ReceiveSteps:
    """Validates each header and runs its transfer on the pair's thread; mixed into Receiver."""

    layout: KVLayout
    kv_caches: KVCaches
    config: TransferConfig
    device: torch.device
    table: TransferTable
    _peers: dict[bytes, ReceiverPair]
    _ipc: IpcExport

    def _header(self, identity: bytes, header: TransferHeader, frame) -> None:
        peer = self._peers.get(identity)
        rid = header.request_id
        if peer is None or peer.generation != header.generation:
            self._reply(identity, Reply(rid, "ack", False, "stale pair: shake hands again"))
            return
        peer.count(+1)
        if rid.startswith("__probe__/"):
            peer.executor.submit(self._guarded, peer, rid, self._probe, peer, header, frame)
            return
        record = self.table.get(rid)
        plan = plan_transfer(peer.layout, self.layout)
        reason = self._refusal(record, header, plan) or self._layout_changed(peer, header)
        if reason:
            if record is not None:
                self.table.end(rid, TransferState.FAILED, reason)
            peer.count(-1)
            self._reply(identity, Reply(rid, "ack", False, reason))
            return
        self.table.start(rid)
        job = self._receive_ipc if peer.path == IPC_PATH else self._receive
        peer.executor.submit(self._guarded, peer, rid, job, peer, record, header, plan, frame)

    def _refusal(self, record: TransferRecord | None, header: TransferHeader,
                 plan: TransferPlan | None) -> str:
        """Why this header cannot be accepted, or '' if it can."""
        if record is None or record.state.terminal:
            state = record.state.value if record else "unknown"
            return f"no reservation for {header.request_id!r} (state {state})"
        if plan is None:
            return "sender and receiver share no layer/head"
        n = header.num_blocks
        if header.dest_block_ids[:n] != record.block_ids[:n] or n > len(record.block_ids):
            return f"destination blocks {header.dest_block_ids[:n]} are not the reserved " \
                   f"{record.block_ids[:n]}"
        want = plan.num_bytes(self.layout, n)
        if header.num_bytes != want:
            return f"{header.num_bytes} bytes for {n} blocks; expected {want}"
        return ""

    def _layout_changed(self, peer: ReceiverPair, header: TransferHeader) -> str:
        """The header's layout and dtype must be the ones this pair shook hands on."""
        if header.src_layout != peer.layout.to_dict() or header.dtype != self.layout.dtype:
            return f"header layout {header.src_layout} ({header.dtype}) is not the handshake's"
        return ""

    def _receive(self, peer: ReceiverPair, record: TransferRecord, header: TransferHeader,
                 plan: TransferPlan, frame) -> None:
        """Unpacks the ZMQ data frame into the reserved blocks, unless aborted meanwhile."""
        start = time.perf_counter()
        blocks = record.block_ids[:header.num_blocks]
        with record.busy:
            if not record.state.terminal:
                unpack(_frame_bytes(frame), self.kv_caches, self.layout, plan, blocks)
                peer.stream.synchronize()  # the KV is in the blocks before DONE
                self.table.add_part(header.request_id, plan, plan.num_cells, header.num_bytes,
                                    time.perf_counter() - start, header.extra)
                self._reply(peer.identity, Reply(header.request_id, "ack"))
                return
        self._reply(peer.identity, Reply(header.request_id, "ack", False,
                                         f"transfer {record.state.value}"))

    def _receive_ipc(self, peer: ReceiverPair, record: TransferRecord, header: TransferHeader,
                     plan: TransferPlan, frame) -> None:
        """cuda_ipc: the sender copies into the blocks itself. This end holds the reservation's
        lock from 'ready' until the sender's 'written' (or the deadline), so an abort waits for
        the copy instead of freeing blocks that are being written."""
        rid, start = header.request_id, time.perf_counter()
        with record.busy:
            if record.state.terminal:
                self._reply(peer.identity, Reply(rid, "ack", False,
                                                 f"transfer {record.state.value}"))
                return
            self._reply(peer.identity, Reply(rid, "ready"))
            written = self._ipc.await_written(peer.identity, rid, record.deadline)
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

    def _probe(self, peer: ReceiverPair, header: TransferHeader, frame) -> None:
        self._reply(peer.identity, Reply(header.request_id, "ack"))

    def _guarded(self, peer: ReceiverPair, request_id: str, job, *args) -> None:
        """Runs a pair job; any failure fails that transfer and tears the pair down (the sender
        shakes hands again on its next transfer)."""
        if peer.stream is None:
            peer.stream = CopyStream(self.device)
        try:
            with peer.stream:
                job(*args)
        except Exception as err:  # noqa: BLE001 - wire errors end this transfer only
            log.warning("kv transfer %s from %s failed: %r", request_id, peer.sender_id, err)
            self.table.end(request_id, TransferState.FAILED, f"{type(err).__name__}: {err}")
            self._reply(peer.identity, Reply(request_id, "ack", False, str(err)))
            self._close_group(peer)
            self._reply(peer.identity, None)  # ask the control thread to forget the pair
        finally:
            peer.count(-1)


def _frame_bytes(frame) -> torch.Tensor:
    """A ZMQ frame's bytes as a uint8 tensor, zero-copy (read-only memory: only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(frame.buffer, dtype=torch.uint8)
