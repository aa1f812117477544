"""Per-pair state of each end of KV transfer: the socket, communicator, worker thread, copy
stream, transport and start-up measurements one (sender, receiver) pair owns."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq

from workers.errors import TransferFailed
from workers.kv_transfer.layout import KVLayout
from workers.kv_transfer.messages import Hello
from workers.kv_transfer.packing import CopyStream
from workers.kv_transfer.pair_group import PairGroup
from workers.protocol import decode


class SenderPair:
    """Sender's end of one pair (one receiver address); touched only by its own thread."""

    def __init__(self, dest: str):
        self.dest = dest
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"kv-send-{dest}")
        self.sock: zmq.Socket | None = None
        self.group: PairGroup | None = None
        self.remote: KVLayout | None = None
        self.generation = 0
        self.path: str | None = None
        self.gbps: float | None = None
        self.pending = 0
        self.last_used = time.monotonic()
        self.stream: CopyStream | None = None
        self.transport = None
        """The started pair's WholeSending (zmq or cuda_ipc); None until the handshake."""
        self.staging: torch.Tensor | None = None
        """ZMQ path on CUDA: pinned host bytes the packed KV is staged through. Reused: the
        pair's next transfer starts only after the receiver acked this one."""

    def stage(self, buf: torch.Tensor) -> torch.Tensor:
        """Copies a CUDA byte buffer into this pair's pinned staging memory (grown as needed)."""
        if self.staging is None or self.staging.numel() < buf.numel():
            self.staging = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=True)
        staged = self.staging[: buf.numel()]
        staged.copy_(buf)
        return staged

    def expect(self, kind: type, deadline: float, closed: threading.Event | None = None,
               request_id: str | None = None):
        """The next `kind` message on the socket (for `request_id`, if given) before the
        deadline; polls in short slices so that closing the sender ends the wait at once."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind.__name__} for {request_id or 'handshake'} "
                                   f"from {self.dest}")
            if closed is not None and closed.is_set():
                raise TransferFailed(request_id or "", "sender closed")
            if not self.sock.poll(int(min(remaining, 0.1) * 1000) + 1):
                continue
            msg = decode(self.sock.recv())
            if isinstance(msg, kind) and (request_id is None or msg.request_id == request_id):
                return msg


class ReceiverPair:
    """Receiver's end of one pair (one sender socket); the control thread creates and
    forgets it, its own thread runs its transfers."""

    def __init__(self, identity: bytes, hello: Hello, generation: int):
        self.identity = identity
        self.sender_id = hello.sender_id
        self.layout = KVLayout.from_dict(hello.layout)
        self.transport = hello.transport
        self.generation = generation
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"kv-recv-{generation}")
        self.group: PairGroup | None = None
        self.built = threading.Event()
        """torch: set once the pair thread's communicator set-up has ended (`group` is then
        final). The sender may be ready a moment before (its warm-up ends first)."""
        self.stream: CopyStream | None = None
        self.path: str | None = None
        self.gbps: float | None = None
        self._pending = 0
        self._lock = threading.Lock()  # pending is counted by the control and pair threads
        self.last_used = time.monotonic()

    @property
    def pending(self) -> int:
        return self._pending

    def count(self, delta: int) -> None:
        with self._lock:
            self._pending += delta
            self.last_used = time.monotonic()
