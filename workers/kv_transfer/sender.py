"""Prefill side of KV transfer that moves a prefilled request whole, through a WholeSending
transport: ZMQ frames (zmq_transport.py) or CUDA IPC copies between two processes on one GPU
(cuda_ipc.py). The torch transport streams instead (workers/kv_transfer/torch_sender.py).

One `SenderPair` per receiver address: a ZMQ DEALER for control and a single worker thread (one
transfer at a time per pair, in order). A pair starts on first use (handshake, transport,
bandwidth probe), is reused, torn down after any failure or when idle, and rebuilt next time.
This file owns the pairs' lifecycle and each transfer's state; the transport moves the bytes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import zmq

from workers.errors import HandshakeMismatch, TransferFailed, TransferTimeout
from workers.kv_transfer.base import (
    KVSender,
    OnDone,
    OnFailed,
    TransferHeader,
    TransferState,
    blocks_to_send,
)
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.cuda_ipc import FALLBACK_FIELDS, IpcPeer, IpcSending, place
from workers.kv_transfer.cuda_ipc import PATH as IPC_PATH
from workers.kv_transfer.layout import KVLayout, check_compatible, plan_transfer
from workers.kv_transfer.messages import Hello, HelloReply, PairReport
from workers.kv_transfer.packing import CopyStream, KVCaches, record_event
from workers.kv_transfer.pair_state import SenderPair
from workers.kv_transfer.transfer_table import TransferRecord, TransferTable
from workers.kv_transfer.zmq_transport import ZmqSending
from workers.protocol import encode

log = logging.getLogger(__name__)


class Sender(KVSender):
    """`send()` queues on the destination's pair thread and returns; see KVSender."""

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, config: TransferConfig,
                 on_done: OnDone | None = None, on_failed: OnFailed | None = None,
                 sender_id: str | None = None):
        self.layout = layout
        self.kv_caches = kv_caches
        self.config = config
        self.sender_id = sender_id or uuid.uuid4().hex
        self.device = kv_caches[0][0].device
        self.table = TransferTable(on_done, on_failed)
        self._ctx = zmq.Context.instance()
        self._pairs: dict[str, SenderPair] = {}
        self._fallback: set[str] = set()
        """cuda_ipc: destinations that refused it (another host/GPU): zmq for them."""
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="kv-send-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def send(self, request_id: str, dest: str, src_block_ids: list[int],
             dest_block_ids: list[int], extra: dict | None = None,
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        num_blocks = blocks_to_send(self.layout.block_size, num_tokens, src_block_ids,
                                    dest_block_ids)
        record = self.table.add(request_id, timeout_s or self.config.timeout_s, peer=dest,
                                block_ids=src_block_ids[:num_blocks], extra=extra)
        # The engine's last prefill step may still be running on its stream.
        ready = record_event(self.device)
        header = TransferHeader(request_id, self.layout.to_dict(), list(dest_block_ids),
                                num_blocks, 0, self.layout.dtype, dict(extra or {}), num_tokens)
        pair = self._pair(dest)
        pair.executor.submit(self._run, pair, record, header, ready)

    def _pair(self, dest: str) -> SenderPair:
        with self._lock:
            pair = self._pairs.get(dest)
            if pair is None:
                pair = self._pairs[dest] = SenderPair(dest)
            pair.pending += 1
            pair.last_used = time.monotonic()
            return pair

    def _run(self, pair: SenderPair, record: TransferRecord, header: TransferHeader,
             ready) -> None:
        """Pair thread: one transfer, start to terminal state."""
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

    def _run_once(self, pair: SenderPair, record: TransferRecord, header: TransferHeader,
                  ready) -> None:
        if self._ensure_started(pair) is None or self.table.start(record.request_id) is None:
            return
        plan = plan_transfer(self.layout, pair.remote)
        if plan is None:
            raise TransferFailed(record.request_id, "sender and receiver share no layer/head")
        header.num_bytes = plan.num_bytes(self.layout, header.num_blocks)
        path = pair.transport.path
        for attempt in range(2):
            header.generation = pair.generation
            start = time.perf_counter()
            reply = pair.transport.push(pair, plan, record, header, ready)
            if reply.ok:
                record.num_bytes, record.seconds = header.num_bytes, time.perf_counter() - start
                self.table.finish(record.request_id, TransferState.DONE)
                return
            if not reply.reason.startswith("stale pair") or attempt == 1:
                raise TransferFailed(record.request_id, reply.reason)
            # The receiver evicted or restarted this pair: shake hands again and retry once.
            self._teardown(pair)
            self._ensure_started(pair)
            if pair.transport is None or pair.transport.path != path:
                raise TransferFailed(record.request_id, "pair changed path (cuda_ipc/zmq)")

    def _ensure_started(self, pair: SenderPair) -> SenderPair | None:
        """Handshake, communicator and probe of a new (or torn-down) pair."""
        if pair.sock is not None or self._closed.is_set():
            return None if self._closed.is_set() else pair
        deadline = time.monotonic() + self.config.connect_timeout_s
        pair.sock = self._ctx.socket(zmq.DEALER)
        pair.sock.setsockopt(zmq.LINGER, 0)
        pair.sock.connect(pair.dest)
        transport = "zmq" if pair.dest in self._fallback else self.config.transport
        here = place(self.device) if transport == IPC_PATH else {}
        pair.sock.send(encode(Hello(self.sender_id, self.layout.to_dict(), transport, here)))
        reply = pair.expect(HelloReply, deadline, self._closed)
        if reply.mismatch:
            field, theirs, mine = reply.mismatch
            self._teardown(pair)
            if transport == IPC_PATH and field in FALLBACK_FIELDS:
                return self._fall_back(pair, HandshakeMismatch(field, mine, theirs))
            raise HandshakeMismatch(field, mine, theirs)
        remote = KVLayout.from_dict(reply.layout)
        try:
            check_compatible(self.layout, remote)
        except HandshakeMismatch:
            self._teardown(pair)
            raise
        pair.remote, pair.generation = remote, reply.generation
        pair.transport = ZmqSending(self.layout, self.kv_caches, self._closed)
        if transport == IPC_PATH:
            try:
                peer = IpcPeer(reply.ipc, self.device, remote)
            except (RuntimeError, ValueError, KeyError, HandshakeMismatch) as err:
                self._teardown(pair)
                return self._fall_back(pair, err)
            pair.transport = IpcSending(peer, self.layout, self.kv_caches, self._closed)
        pair.path = pair.transport.path
        pair.gbps = pair.transport.probe(pair, self.config.probe_bytes, self.config.probe_rounds,
                                         deadline)
        pair.sock.send(encode(PairReport(pair.path, pair.gbps or 0.0)))
        log.info("kv pair %s -> %s: path %s, %.2f GB/s", self.sender_id, pair.dest,
                 pair.path, pair.gbps or 0.0)
        return pair

    def _fall_back(self, pair: SenderPair, why: Exception) -> SenderPair | None:
        """cuda_ipc refused or failed for this destination: use zmq for it from now on."""
        log.warning("kv pair %s -> %s: cuda_ipc unavailable (%s); falling back to zmq",
                    self.sender_id, pair.dest, why)
        self._fallback.add(pair.dest)
        return self._ensure_started(pair)

    def _teardown(self, pair: SenderPair) -> None:
        """Drops the pair's socket and communicator; the next transfer starts it afresh.
        Runs on the pair's own thread (its socket's only user)."""
        if pair.sock is not None:
            pair.sock.close(linger=0)
        pair.sock = pair.remote = pair.transport = None
        pair.staging = None  # a dropped message may still reference it

    def _watch(self) -> None:
        while not self._closed.wait(self.config.tick_s):
            self.table.expire()
            now = time.monotonic()
            with self._lock:
                idle = [p for p in self._pairs.values()
                        if p.pending == 0 and now - p.last_used > self.config.idle_evict_s]
                for pair in idle:
                    del self._pairs[pair.dest]
            for pair in idle:
                log.info("kv pair -> %s idle for %.0f s: evicted", pair.dest, now - pair.last_used)
                pair.executor.submit(self._teardown, pair)
                pair.executor.shutdown(wait=False)

    def pairs(self) -> list[str]:
        """Destinations with a live pair (for eviction tests and metrics)."""
        with self._lock:
            return [d for d, p in self._pairs.items() if p.sock is not None or p.pending]

    def path(self, peer: str) -> str | None:
        pair = self._pairs.get(peer)
        return pair.path if pair else None

    def bandwidth(self, peer: str) -> float | None:
        pair = self._pairs.get(peer)
        return pair.gbps if pair else None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.table.fail_all("sender closed")
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.executor.submit(self._teardown, pair)
            pair.executor.shutdown(wait=True, cancel_futures=True)
        self._watchdog.join()

