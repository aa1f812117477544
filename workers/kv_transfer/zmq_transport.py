"""ZMQ transport: a prefilled request's KV packed into one buffer and sent as one data frame
behind its TransferHeader; the receiver unpacks the frame into the reserved blocks.

The fallback path (any two hosts, no GPU needed). On CUDA the packed bytes are staged through
the pair's pinned host memory. Both halves run on their pair's thread, behind the protocol
`Sender` and `Receiver` use for every transport that moves a request whole
(the WholeSending / WholeReceiving protocol in base.py).
"""

from __future__ import annotations

import threading
import time
import warnings

import torch

from workers.errors import TransferFailed
from workers.kv_transfer.base import TransferHeader
from workers.kv_transfer.layout import KVLayout, TransferPlan
from workers.kv_transfer.messages import Reply
from workers.kv_transfer.packing import KVCaches, as_bytes, pack, unpack
from workers.kv_transfer.pair_state import ReceiverPair, SenderPair
from workers.kv_transfer.probe import measure_gbps
from workers.kv_transfer.transfer_table import TransferRecord, TransferTable
from workers.protocol import encode

PATH = "zmq"


class ZmqSending:
    """Sender half: pack, one multipart message (header + data), the receiver's ack."""

    path = PATH

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, closed: threading.Event):
        self.layout = layout
        self.kv_caches = kv_caches
        self.device = kv_caches[0][0].device
        self._closed = closed

    def push(self, pair: SenderPair, plan: TransferPlan, record: TransferRecord,
             header: TransferHeader, ready) -> Reply:
        with record.busy:
            if record.state.terminal:
                return Reply(header.request_id, "ack", False, f"transfer {record.state.value}")
            buf = self._pack(pair, plan, record.block_ids, ready)
        return self._send(pair, header, buf, record.deadline)

    def probe(self, pair: SenderPair, bytes_: int, rounds: int, deadline: float) -> float | None:
        """GB/s of `rounds` probe messages of `bytes_` each (the receiver acks each)."""
        if bytes_ <= 0:
            return None
        buf = torch.zeros(bytes_, dtype=torch.uint8, device=self.device)
        if self.device.type == "cuda":
            buf = pair.stage(buf)

        def one_round(i: int) -> None:
            header = TransferHeader(f"__probe__/{i}", {}, [], 0, bytes_, "uint8",
                                    generation=pair.generation)
            reply = self._send(pair, header, buf, deadline)
            if not reply.ok:
                raise TransferFailed(header.request_id, reply.reason)

        return measure_gbps(one_round, bytes_, rounds)

    def _pack(self, pair: SenderPair, plan: TransferPlan, block_ids: list[int],
              ready) -> torch.Tensor:
        pair.stream.wait_event(ready)
        buf = as_bytes(pack(self.kv_caches, self.layout, plan, block_ids))
        # Until the copy is done the source blocks are still being read.
        pair.stream.synchronize()
        if self.device.type == "cuda":
            buf = pair.stage(buf)
        return buf

    def _send(self, pair: SenderPair, header: TransferHeader, buf: torch.Tensor,
              deadline: float) -> Reply:
        pair.sock.send_multipart([encode(header), memoryview(buf.numpy())], copy=False)
        return pair.expect(Reply, deadline, self._closed, header.request_id)


class ZmqReceiving:
    """Receiver half: unpacks the data frame into the reserved blocks, unless aborted."""

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, table: TransferTable, reply):
        self.layout = layout
        self.kv_caches = kv_caches
        self.table = table
        self._reply = reply

    def receive(self, peer: ReceiverPair, record: TransferRecord, header: TransferHeader,
                plan: TransferPlan, frame) -> None:
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


def _frame_bytes(frame) -> torch.Tensor:
    """A ZMQ frame's bytes as a uint8 tensor, zero-copy (read-only memory: only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(frame.buffer, dtype=torch.uint8)
