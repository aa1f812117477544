"""Decode side of KV transfer over the network: one ZMQ ROUTER address for every sender.

A control thread owns the ROUTER: it answers handshakes, validates headers against the
reservations made by `expect`, fires deadlines and evicts idle pairs. Each sender pair has one
worker thread that posts the torch.distributed recv (or takes the ZMQ data frame) and unpacks
into the reserved blocks; its replies go back through an inproc queue to the control thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import warnings

import torch
import zmq

from workers.errors import HandshakeMismatch
from workers.kv_transfer.base import KVReceiver, OnDone, OnFailed, TransferHeader, TransferState
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.cuda_ipc import PATH as IPC_PATH
from workers.kv_transfer.cuda_ipc import IpcExport
from workers.kv_transfer.layout import KVLayout, TransferPlan, check_compatible, plan_transfer
from workers.kv_transfer.messages import Hello, HelloReply, PairReport, Reply
from workers.kv_transfer.packing import CopyStream, KVCaches, chunk_views, unpack
from workers.kv_transfer.pair_group import RECEIVER_RANK, PairGroup, host_store
from workers.kv_transfer.pair_state import ReceiverPair
from workers.kv_transfer.transfer_table import TransferRecord, TransferTable
from workers.protocol import decode, encode

log = logging.getLogger(__name__)


class Receiver(KVReceiver):
    """Binds `config.host:config.port` (0: a free port) at construction; see KVReceiver."""

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, config: TransferConfig,
                 on_done: OnDone | None = None, on_failed: OnFailed | None = None):
        self.layout = layout
        self.kv_caches = kv_caches
        self.config = config
        self.device = kv_caches[0][0].device
        self.table = TransferTable(on_done, on_failed)
        self.refusals: list[HandshakeMismatch] = []
        """Handshakes this end refused (newest last), for logs and tests."""
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if config.port:
            self._sock.bind(f"tcp://{config.host}:{config.port}")
            port = config.port
        else:
            port = self._sock.bind_to_random_port(f"tcp://{config.host}")
        self.address = f"tcp://{config.host}:{port}"
        self._outbox_addr = f"inproc://kv-recv-outbox-{id(self)}"
        self._outbox = self._ctx.socket(zmq.PULL)
        self._outbox.bind(self._outbox_addr)
        # One PUSH end for every pair thread: a lock makes each send whole, which is all
        # a ZMQ socket asks of threads that share it.
        self._pusher = self._ctx.socket(zmq.PUSH)
        self._pusher.setsockopt(zmq.LINGER, 0)
        self._pusher.connect(self._outbox_addr)
        self._pusher_lock = threading.Lock()
        self._peers: dict[bytes, ReceiverPair] = {}
        self._ipc = IpcExport(kv_caches, self.device, config.probe_bytes)
        self._generations = itertools.count(1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-recv", daemon=True)
        self._thread.start()

    def expect(self, request_id: str, block_ids: list[int],
               timeout_s: float | None = None) -> None:
        cells = len(self.layout.layers) * len(self.layout.kv_heads)
        self.table.add(request_id, timeout_s or self.config.timeout_s, block_ids=block_ids,
                       cells_needed=cells)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._outbox, zmq.POLLIN)
        while not self._closed.is_set():
            ready = dict(poller.poll(int(self.config.tick_s * 1000)))
            if self._sock in ready:
                frames = self._sock.recv_multipart(copy=False)
                try:
                    self._handle(frames[0].bytes, decode(frames[1].bytes), frames[2:])
                except Exception:  # noqa: BLE001 - one bad message must not stop the loop
                    log.exception("kv receiver: bad control message")
            while self._outbox.poll(0):
                identity, payload = self._outbox.recv_multipart()
                if payload:
                    self._sock.send_multipart([identity, payload])
                else:
                    self._forget(identity)
            self.table.expire()
            self._evict_idle()

    def _handle(self, identity: bytes, msg, data: list) -> None:
        if isinstance(msg, Hello):
            self._hello(identity, msg)
        elif isinstance(msg, TransferHeader):
            self._header(identity, msg, data[0] if data else None)
        elif isinstance(msg, Reply) and msg.kind == "written":
            self._ipc.deliver(identity, msg)
        elif isinstance(msg, PairReport) and identity in self._peers:
            peer = self._peers[identity]
            peer.path, peer.gbps = msg.path, msg.gbps
            log.info("kv pair %s -> %s: path %s, %.2f GB/s", peer.sender_id[:8], self.address,
                     msg.path, msg.gbps)

    def _hello(self, identity: bytes, hello: Hello) -> None:
        ipc = {}
        try:
            check_compatible(self.layout, KVLayout.from_dict(hello.layout))
            if hello.transport == IPC_PATH:
                ipc = self._ipc.accept(hello.ipc)  # refuses another host/GPU by name
        except HandshakeMismatch as err:
            log.warning("kv receiver %s refused sender %s: %s", self.address, hello.sender_id,
                        err)
            self.refusals.append(err)
            self._reply(identity, HelloReply(self.layout.to_dict(),
                                             [err.field, err.local, err.remote]))
            return
        for old in [p for p in self._peers.values() if p.sender_id == hello.sender_id]:
            self._drop(old)  # the sender restarted its side of the pair
        peer = ReceiverPair(identity, hello, next(self._generations))
        self._peers[identity] = peer
        store_port = 0
        if hello.transport == "torch":
            store = host_store(self.config.host, self.config.connect_timeout_s)
            store_port = store.port
            peer.executor.submit(self._build_group, peer, store)
        else:
            peer.path = IPC_PATH if ipc else "zmq"
        self._reply(identity, HelloReply(self.layout.to_dict(), [], store_port, peer.generation,
                                         ipc))

    def _build_group(self, peer: ReceiverPair, store) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            peer.group = PairGroup(store, self.config.host, store.port, RECEIVER_RANK,
                                   peer.generation, self.device, self.config.connect_timeout_s)
            peer.path = peer.group.backend
        except RuntimeError as err:
            log.warning("kv pair with %s: communicator failed: %s", peer.sender_id, err)

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
        if header.chunks and (sum(header.chunks) != plan.num_layers or min(header.chunks) < 1):
            return f"chunks {header.chunks} do not split {plan.num_layers} layers"
        return ""

    def _layout_changed(self, peer: ReceiverPair, header: TransferHeader) -> str:
        """The header's layout and dtype must be the ones this pair shook hands on."""
        if header.src_layout != peer.layout.to_dict() or header.dtype != self.layout.dtype:
            return f"header layout {header.src_layout} ({header.dtype}) is not the handshake's"
        return ""

    def _receive(self, peer: ReceiverPair, record: TransferRecord, header: TransferHeader,
                 plan: TransferPlan, frame) -> None:
        """Unpacks each chunk as it lands (the next one is on the wire meanwhile); an abort or
        deadline between chunks stops the writes but still drains the pair's data."""
        start = time.perf_counter()
        views = chunk_views(plan, self.layout, header.num_blocks, header.chunks)
        blocks = record.block_ids[:header.num_blocks]
        if frame is not None:
            buf, works = _frame_bytes(frame), [None] * len(views)
        else:
            buf, works = self._post_recvs(peer, header, [(lo, hi) for _, lo, hi in views])
        landed = True
        for (sub, lo, hi), work in zip(views, works, strict=True):
            if work is not None:
                peer.group.wait(work, record.deadline - time.monotonic())
            with record.busy:
                landed = landed and not record.state.terminal
                if landed:
                    unpack(buf[lo:hi], self.kv_caches, self.layout, sub, blocks)
                    peer.stream.synchronize()  # the KV is in the blocks before DONE
        with record.busy:
            if landed and not record.state.terminal:
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
        if frame is None:
            _, works = self._post_recvs(peer, header, [(0, header.num_bytes)])
            peer.group.wait(works[0], self.config.connect_timeout_s)
        self._reply(peer.identity, Reply(header.request_id, "ack"))

    def _post_recvs(self, peer: ReceiverPair, header: TransferHeader,
                    ranges: list[tuple[int, int]]):
        """Posts one recv per byte range of a new buffer, then tells the sender to send."""
        if peer.group is None:
            raise RuntimeError(f"pair with {peer.sender_id} has no communicator")
        buf = torch.empty(header.num_bytes, dtype=torch.uint8, device=self.device)
        works = [peer.group.post_recv(buf[lo:hi], tag) for tag, (lo, hi) in enumerate(ranges)]
        self._reply(peer.identity, Reply(header.request_id, "ready"))
        return buf, works

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

    def _reply(self, identity: bytes, msg) -> None:
        """Queues a control reply; callable from any thread. msg None: drop that pair."""
        if threading.current_thread() is self._thread:
            if msg is None:
                self._forget(identity)
            else:
                self._sock.send_multipart([identity, encode(msg)])
            return
        with self._pusher_lock:
            if not self._pusher.closed:
                self._pusher.send_multipart([identity, encode(msg) if msg is not None else b""])

    def _forget(self, identity: bytes) -> None:
        peer = self._peers.pop(identity, None)
        self._ipc.forget(identity)
        if peer is not None:
            peer.executor.shutdown(wait=False)

    def _drop(self, peer: ReceiverPair) -> None:
        self._peers.pop(peer.identity, None)
        peer.executor.submit(self._close_group, peer)
        peer.executor.shutdown(wait=False)

    def _close_group(self, peer: ReceiverPair) -> None:
        if peer.group is not None:
            peer.group.close()
            peer.group = None

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for peer in list(self._peers.values()):
            if peer.pending == 0 and now - peer.last_used > self.config.idle_evict_s:
                log.info("kv pair with %s idle for %.0f s: evicted", peer.sender_id,
                         now - peer.last_used)
                self._drop(peer)

    def peers(self) -> list[str]:
        """Sender ids with a live pair (for eviction tests and metrics)."""
        return [p.sender_id for p in list(self._peers.values())]

    def _find(self, sender_id: str) -> ReceiverPair | None:
        return next((p for p in list(self._peers.values()) if p.sender_id == sender_id), None)

    def path(self, peer: str) -> str | None:
        found = self._find(peer)
        return found.path if found else None

    def bandwidth(self, peer: str) -> float | None:
        found = self._find(peer)
        return found.gbps if found else None

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join()
        self.table.fail_all("receiver closed")
        for peer in list(self._peers.values()):
            self._drop(peer)
        with self._pusher_lock:
            self._pusher.close(linger=0)
        self._outbox.close(linger=0)
        self._sock.close(linger=0)


def _frame_bytes(frame) -> torch.Tensor:
    """A ZMQ frame's bytes as a uint8 tensor, zero-copy (read-only memory: only read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(frame.buffer, dtype=torch.uint8)
