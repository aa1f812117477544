"""One transfer on a sender pair's thread: pack (or the cuda_ipc copy), push, await the acks.

The per-transfer half of `Sender` (workers/kv_transfer/sender.py), which keeps the pair's
setup (handshake, communicator, cuda_ipc import or fallback to zmq, probe) and teardown.
`SendSteps` is a mixin: it reads Sender's `layout`, `kv_caches`, `config`, `device`, `table`,
`_ipc` and `_closed`, and calls its `_ensure_started` and `_teardown`.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import zmq

from workers.errors import HandshakeMismatch, TransferFailed, TransferTimeout
from workers.kv_transfer.base import TransferHeader, TransferState
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.cuda_ipc import IpcPeer
from workers.kv_transfer.layout import KVLayout, plan_transfer
from workers.kv_transfer.messages import Reply
from workers.kv_transfer.packing import (
    CopyStream,
    KVCaches,
    as_bytes,
    pack,
)
from workers.kv_transfer.pair_state import SenderPair
from workers.kv_transfer.transfer_table import TransferRecord, TransferTable
from workers.protocol import decode, encode

log = logging.getLogger(__name__)


class SendSteps:
    """Runs each transfer on its pair's thread, in order; mixed into Sender."""

    layout: KVLayout
    kv_caches: KVCaches
    config: TransferConfig
    device: torch.device
    table: TransferTable
    _ipc: dict[str, IpcPeer]
    _closed: threading.Event
    _lock: threading.Lock

    def _run(self, pair: SenderPair, record: TransferRecord, header: TransferHeader, ready) -> None:
        if pair.stream is None:
            pair.stream = CopyStream(self.device)
        try:
            with pair.stream:
                self._run_once(pair, record, header, ready)
        except (HandshakeMismatch, TransferFailed) as err:
            self.table.finish(record.request_id, TransferState.FAILED, str(err), err)
        except Exception as err:  # noqa: BLE001 - any wire error fails this transfer only
            log.warning("kv transfer %s to %s failed: %r", record.request_id, pair.dest, err)
            self._teardown(pair)
            reason = f"{type(err).__name__}: {err}"
            late = isinstance(err, TimeoutError) or time.monotonic() >= record.deadline
            typed = TransferTimeout(record.request_id, record.timeout_s,
                                    time.monotonic() - record.created) if late else None
            self.table.finish(record.request_id, TransferState.FAILED, reason, typed)
        finally:
            with self._lock:
                pair.pending -= 1
                pair.last_used = time.monotonic()

    def _run_once(self, pair, record: TransferRecord, header: TransferHeader, ready) -> None:
        if self._ensure_started(pair) is None or self.table.start(record.request_id) is None:
            return
        plan = plan_transfer(self.layout, pair.remote)
        if plan is None:
            raise TransferFailed(record.request_id, "sender and receiver share no layer/head")
        ipc = self._ipc.get(pair.dest)
        with record.busy:
            if record.state.terminal:
                return
            buf = None if ipc else self._pack(pair, plan, record.block_ids, ready)
        header.num_bytes = plan.num_bytes(self.layout, header.num_blocks) if ipc else buf.numel()
        for attempt in range(2):
            header.generation = pair.generation
            start = time.perf_counter()
            if ipc is not None:
                reply = self._push_ipc(pair, ipc, plan, record, header, ready)
            else:
                reply = self._push(pair, header, buf, record.deadline)
            if reply.ok:
                record.num_bytes, record.seconds = header.num_bytes, time.perf_counter() - start
                self.table.finish(record.request_id, TransferState.DONE)
                return
            if not reply.reason.startswith("stale pair") or attempt == 1:
                raise TransferFailed(record.request_id, reply.reason)
            # The receiver evicted or restarted this pair: shake hands again and retry once.
            self._teardown(pair)
            self._ensure_started(pair)
            if (self._ipc.get(pair.dest) is None) != (ipc is None):
                raise TransferFailed(record.request_id, "pair changed path (cuda_ipc/zmq)")
            ipc = self._ipc.get(pair.dest)

    def _pack(self, pair: SenderPair, plan, block_ids: list[int], ready) -> torch.Tensor:
        pair.stream.wait_event(ready)
        buf = as_bytes(pack(self.kv_caches, self.layout, plan, block_ids))
        # Until the copy is done the source blocks are still being read.
        pair.stream.synchronize()
        if self.device.type == "cuda":
            buf = pair.stage(buf)
        return buf

    def _push(self, pair: SenderPair, header: TransferHeader, buf: torch.Tensor,
              deadline: float) -> Reply:
        """Sends header and data as one ZMQ message; returns the receiver's final reply."""
        pair.sock.send_multipart([encode(header), _frame(buf)], copy=False)
        return self._await(pair, header.request_id, deadline)

    def _push_ipc(self, pair: SenderPair, ipc: IpcPeer, plan, record: TransferRecord,
                  header: TransferHeader, ready) -> Reply:
        """cuda_ipc: header; the receiver's 'ready' (it now holds the reservation); the copy
        straight into its blocks; 'written'; returns its final ack (or refusal)."""
        pair.sock.send(encode(header))
        reply = self._await(pair, header.request_id, record.deadline)
        if not reply.ok or reply.kind != "ready":
            return reply
        ok, reason = True, ""
        with record.busy:
            if record.state.terminal:
                ok, reason = False, f"transfer {record.state.value}"
            else:
                try:
                    pair.stream.wait_event(ready)
                    ipc.copy(self.kv_caches, self.layout, plan, record.block_ids,
                             header.dest_block_ids[:header.num_blocks])
                    pair.stream.synchronize()  # in place before the receiver marks DONE
                except Exception as err:  # noqa: BLE001 - any copy error: FAILED on both ends
                    ok, reason = False, f"{type(err).__name__}: {err}"
        pair.sock.send(encode(Reply(header.request_id, "written", ok, reason)))
        return self._await(pair, header.request_id, record.deadline)

    def _await(self, pair: SenderPair, request_id: str, deadline: float) -> Reply:
        return _expect(pair.sock, Reply, deadline, pair.dest, self._closed, request_id)


def _expect(sock: zmq.Socket, kind: type, deadline: float, peer: str,
            closed: threading.Event | None = None, request_id: str | None = None):
    """The next `kind` message (for `request_id`, if given) before the deadline; polls in
    short slices so that closing the sender ends the wait at once."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {kind.__name__} for {request_id or 'handshake'} from {peer}")
        if closed is not None and closed.is_set():
            raise TransferFailed(request_id or "", "sender closed")
        if not sock.poll(int(min(remaining, 0.1) * 1000) + 1):
            continue
        msg = decode(sock.recv())
        if isinstance(msg, kind) and (request_id is None or msg.request_id == request_id):
            return msg


def _frame(buf: torch.Tensor) -> memoryview:
    """Zero-copy view of a contiguous CPU byte tensor for ZMQ (copy=False)."""
    return memoryview(buf.numpy())
