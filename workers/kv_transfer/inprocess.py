"""In-process KV transfer, for engine-level tests: the same contract, tensors copied directly.

Receivers register under a name in an `InProcessHub`; a sender's `send` finds the receiver by
that name and copies synchronously (so `on_done` has run when `send` returns). The handshake,
plan, reservation checks and states are the network backends' own.
"""

from __future__ import annotations

import threading
import time

from workers.errors import HandshakeMismatch
from workers.kv_transfer.base import (
    KVReceiver,
    KVSender,
    OnDone,
    OnFailed,
    TransferState,
    blocks_to_send,
)
from workers.kv_transfer.layout import KVLayout, check_compatible, plan_transfer
from workers.kv_transfer.packing import KVCaches, pack, unpack
from workers.kv_transfer.transfer_table import TransferTable


class InProcessHub:
    """Name -> receiver, shared by the senders and receivers of one test."""

    def __init__(self) -> None:
        self._receivers: dict[str, InProcessReceiver] = {}
        self._lock = threading.Lock()

    def register(self, receiver: InProcessReceiver) -> None:
        with self._lock:
            self._receivers[receiver.address] = receiver

    def unregister(self, address: str) -> None:
        with self._lock:
            self._receivers.pop(address, None)

    def get(self, address: str) -> InProcessReceiver | None:
        with self._lock:
            return self._receivers.get(address)


class InProcessReceiver(KVReceiver):
    def __init__(self, hub: InProcessHub, address: str, layout: KVLayout, kv_caches: KVCaches,
                 timeout_s: float = 30.0, on_done: OnDone | None = None,
                 on_failed: OnFailed | None = None):
        self.hub, self.address, self.layout, self.kv_caches = hub, address, layout, kv_caches
        self.timeout_s = timeout_s
        self.table = TransferTable(on_done, on_failed)
        hub.register(self)

    def expect(self, request_id: str, block_ids: list[int],
               timeout_s: float | None = None) -> None:
        cells = len(self.layout.layers) * len(self.layout.kv_heads)
        self.table.add(request_id, timeout_s or self.timeout_s, block_ids=block_ids,
                       cells_needed=cells)

    def deliver(self, request_id: str, sender: InProcessSender, src_block_ids: list[int],
                dest_block_ids: list[int], extra: dict) -> str:
        """Copies one sender's part into the reserved blocks; returns '' or why it refused."""
        self.table.expire()
        record = self.table.get(request_id)
        if record is None or record.state.terminal:
            return f"no reservation for {request_id!r}"
        n = len(src_block_ids)
        if dest_block_ids[:n] != record.block_ids[:n] or n > len(record.block_ids):
            return f"destination blocks {dest_block_ids[:n]} are not the reserved blocks"
        plan = plan_transfer(sender.layout, self.layout)
        if plan is None:
            return "sender and receiver share no layer/head"
        with record.busy:
            if self.table.start(request_id) is None:
                return f"transfer {record.state.value}"
            start = time.perf_counter()
            buf = pack(sender.kv_caches, sender.layout, plan, src_block_ids)
            unpack(buf, self.kv_caches, self.layout, plan, record.block_ids[:n])
            self.table.add_part(request_id, plan, plan.num_cells,
                                buf.numel() * buf.element_size(), time.perf_counter() - start,
                                extra)
        return ""

    def path(self, peer: str) -> str | None:
        return "inprocess"

    def bandwidth(self, peer: str) -> float | None:
        return None

    def close(self) -> None:
        self.table.fail_all("receiver closed")
        self.hub.unregister(self.address)


class InProcessSender(KVSender):
    def __init__(self, hub: InProcessHub, layout: KVLayout, kv_caches: KVCaches,
                 timeout_s: float = 30.0, on_done: OnDone | None = None,
                 on_failed: OnFailed | None = None):
        self.hub, self.layout, self.kv_caches, self.timeout_s = hub, layout, kv_caches, timeout_s
        self.table = TransferTable(on_done, on_failed)

    def send(self, request_id: str, dest: str, src_block_ids: list[int],
             dest_block_ids: list[int], extra: dict | None = None,
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        num_blocks = blocks_to_send(self.layout.block_size, num_tokens, src_block_ids,
                                    dest_block_ids)
        self.table.add(request_id, timeout_s or self.timeout_s, peer=dest)
        self.table.start(request_id)
        receiver = self.hub.get(dest)
        if receiver is None:
            self.table.finish(request_id, TransferState.FAILED, f"no receiver at {dest!r}")
            return
        try:
            check_compatible(self.layout, receiver.layout)
        except HandshakeMismatch as err:
            self.table.finish(request_id, TransferState.FAILED, str(err), err)
            return
        reason = receiver.deliver(request_id, self, src_block_ids[:num_blocks],
                                  list(dest_block_ids), dict(extra or {}))
        if reason:
            self.table.finish(request_id, TransferState.FAILED, reason)
        else:
            self.table.finish(request_id, TransferState.DONE)

    def path(self, peer: str) -> str | None:
        return "inprocess"

    def bandwidth(self, peer: str) -> float | None:
        return None

    def close(self) -> None:
        self.table.fail_all("sender closed")
