"""ZMQ PUSH of wire messages (workers/protocol.py) to a PULL socket, one socket per address:
`OutputChunk`s to the gateway, `WorkerNews` to the router.

Workers stream tokens here, never through Ray calls. A ZMQ socket is not thread-safe, so each
`OutputSender` is used from one thread (a worker's engine loop) or guarded by its lock, which
`send` takes so the router's error chunks and a worker's tokens can share one sender.
"""

from __future__ import annotations

import threading
from typing import Any

import zmq

from workers.protocol import encode

# Chunks queued for an unreachable gateway are dropped at close instead of blocking exit.
_LINGER_MS = 1000
# A gateway that stops reading must not stall the engine loop: past this many queued chunks
# per gateway, chunks are dropped (and counted) rather than blocking the sender.
_SEND_HWM = 100_000


class OutputSender:
    """Sends chunks to any number of gateway addresses, connecting lazily to each."""

    def __init__(self, context: zmq.Context | None = None):
        self._context = context or zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket] = {}
        self._lock = threading.Lock()
        self.num_dropped = 0

    def send(self, address: str, msg: Any) -> None:
        """Queues one message for `address`; never blocks on a slow or absent receiver."""
        with self._lock:
            socket = self._sockets.get(address)
            if socket is None:
                socket = self._context.socket(zmq.PUSH)
                socket.setsockopt(zmq.LINGER, _LINGER_MS)
                socket.setsockopt(zmq.SNDHWM, _SEND_HWM)
                socket.connect(address)
                self._sockets[address] = socket
            try:
                socket.send(encode(msg), flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.num_dropped += 1

    def close(self) -> None:
        with self._lock:
            for socket in self._sockets.values():
                socket.close()
            self._sockets.clear()
