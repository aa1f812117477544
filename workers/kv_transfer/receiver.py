"""Decode side of KV transfer over the network: one ZMQ ROUTER address for every sender.

A control thread owns the ROUTER: it answers handshakes, validates headers against the
reservations made by `expect`, fires deadlines and evicts idle pairs. The bytes move through one
transport per pair: the torch stream's receives (torch_receiver.TorchReceiving), or, for a
request moved whole behind a TransferHeader, a WholeReceiving on the pair's own thread (ZMQ
data frame: zmq_transport.ZmqReceiving; CUDA IPC: cuda_ipc.IpcReceiving). Replies from other
threads go back through an inproc queue to the control thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import torch
import zmq

from workers.errors import HandshakeMismatch
from workers.kv_transfer.base import (
    KVReceiver,
    OnDone,
    OnFailed,
    TransferHeader,
    TransferState,
    header_refusal,
)
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.cuda_ipc import PATH as IPC_PATH
from workers.kv_transfer.cuda_ipc import IpcExport, IpcReceiving
from workers.kv_transfer.layout import KVLayout, check_compatible, plan_transfer
from workers.kv_transfer.messages import (
    Hello,
    HelloReply,
    PairReport,
    Reply,
    StreamEnd,
    StreamPart,
)
from workers.kv_transfer.outbox import Outbox
from workers.kv_transfer.packing import CopyStream, KVCaches
from workers.kv_transfer.pair_group import host_store
from workers.kv_transfer.pair_state import ReceiverPair
from workers.kv_transfer.timeline import mark
from workers.kv_transfer.torch_receiver import TorchReceiving
from workers.kv_transfer.transfer_table import TransferTable
from workers.kv_transfer.zmq_transport import ZmqReceiving
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
        self._outbox = Outbox(self._ctx, "kv-recv-outbox")
        self._peers: dict[bytes, ReceiverPair] = {}
        self._ipc = IpcExport(kv_caches, self.device, config.probe_bytes)
        self._generations = itertools.count(1)
        self._torch = TorchReceiving(layout, kv_caches, config, self.table, self._reply)
        self._whole = {"zmq": ZmqReceiving(layout, kv_caches, self.table, self._reply),
                       IPC_PATH: IpcReceiving(self._ipc, self.table, self._reply)}
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
        poller.register(self._outbox.socket, zmq.POLLIN)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while not self._closed.is_set():
            ready = dict(poller.poll(int(self.config.tick_s * 1000)))
            if self._sock in ready:
                frames = self._sock.recv_multipart(copy=False)
                mark("r.ctl_in")
                try:
                    self._handle(frames[0].bytes, decode(frames[1].bytes), frames[2:])
                except Exception:  # noqa: BLE001 - one bad message must not stop the loop
                    log.exception("kv receiver: bad control message")
            while self._outbox.socket.poll(0):
                identity, payload = self._outbox.socket.recv_multipart()
                if payload:
                    self._sock.send_multipart([identity, payload])
                else:
                    self._forget(identity)
            self.table.expire()
            self._torch.poll(self._peers, self._drop)
            self._evict_idle()

    def _handle(self, identity: bytes, msg, data: list) -> None:
        if identity in self._peers:
            self._peers[identity].count(0)  # any message is use
        if isinstance(msg, Hello):
            self._hello(identity, msg)
        elif isinstance(msg, StreamPart) and identity in self._peers:
            peer = self._peers[identity]
            # The sender's first part can overtake this end's set-up by a thread switch:
            # wait for it rather than refuse the part as stale.
            peer.built.wait(self.config.connect_timeout_s if peer.transport == "torch" else 0)
            self._torch.part(peer, msg)
        elif isinstance(msg, StreamEnd) and identity in self._peers:
            self._torch.end(self._peers[identity], msg)
        elif isinstance(msg, StreamPart | StreamEnd):
            rids = [e[0] for e in msg.entries] if isinstance(msg, StreamPart) else \
                [msg.request_id]
            for rid in rids:
                self._reply(identity, Reply(rid, "ack", False, "stale pair: shake hands again"))
        elif isinstance(msg, TransferHeader):
            self._header(identity, msg, data[0] if data else None)
        elif isinstance(msg, Reply) and msg.kind == "written":
            self._ipc.deliver(identity, msg)
        elif isinstance(msg, PairReport) and identity in self._peers:
            peer = self._peers[identity]
            peer.path, peer.gbps = msg.path, msg.gbps
            log.info("kv pair %s -> %s: path %s, %.2f GB/s", peer.sender_id, self.address,
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
            peer.count(+1)  # set-up is use: an idle sweep never cuts a pair mid-build
            peer.executor.submit(self._set_up, peer, store, hello)
        else:
            peer.path = IPC_PATH if ipc else "zmq"
        self._reply(identity, HelloReply(self.layout.to_dict(), [], store_port, peer.generation,
                                         ipc))

    def _header(self, identity: bytes, header: TransferHeader, frame) -> None:
        """A request moved whole: checked against its reservation here, landed by the pair's
        transport on the pair's thread."""
        peer = self._peers.get(identity)
        rid = header.request_id
        if peer is None or peer.generation != header.generation:
            self._reply(identity, Reply(rid, "ack", False, "stale pair: shake hands again"))
            return
        peer.count(+1)
        if rid.startswith("__probe__/"):  # the start-up probe: its bytes only, acked
            peer.executor.submit(self._guarded, peer, rid, self._reply, identity,
                                 Reply(rid, "ack"))
            return
        record = self.table.get(rid)
        plan = plan_transfer(peer.layout, self.layout)
        transport = self._whole.get(peer.path or "")
        reason = header_refusal(record, header, plan, self.layout, peer.layout) or (
            "" if transport else f"a {peer.path} pair takes no TransferHeader")
        if reason:
            if record is not None:
                self.table.end(rid, TransferState.FAILED, reason)
            peer.count(-1)
            self._reply(identity, Reply(rid, "ack", False, reason))
            return
        self.table.start(rid)
        peer.executor.submit(self._guarded, peer, rid, transport.receive, peer, record, header,
                             plan, frame)

    def _set_up(self, peer: ReceiverPair, store, hello: Hello) -> None:
        try:
            self._torch.build(peer, store, hello)
        finally:
            peer.built.set()
            peer.count(-1)

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
        self._outbox.put([identity, encode(msg) if msg is not None else b""])

    def _forget(self, identity: bytes) -> None:
        peer = self._peers.pop(identity, None)
        self._ipc.forget(identity)
        if peer is not None:
            peer.executor.shutdown(wait=False)

    def _drop(self, peer: ReceiverPair) -> None:
        self._peers.pop(peer.identity, None)
        self._torch.cancel(peer)  # before the abort: what it ends counts as failed
        peer.executor.submit(self._close_group, peer)
        peer.executor.shutdown(wait=False)

    def _close_group(self, peer: ReceiverPair) -> None:
        if peer.group is not None:
            peer.group.close()
            peer.group = None

    def _evict_idle(self) -> None:
        """Drops pairs idle for twice the sender's bound: the sender, which knows when it
        uses a pair next, lets go first, so a part never reaches a pair evicted under it."""
        now = time.monotonic()
        for peer in list(self._peers.values()):
            if peer.pending == 0 and now - peer.last_used > 2 * self.config.idle_evict_s \
                    and not self._torch.pending():
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
            peer.executor.shutdown(wait=True)
        self._torch.close()
        self._outbox.close()
        self._sock.close(linger=0)
