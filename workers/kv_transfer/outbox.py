"""Frames from any thread to one control thread that owns ZMQ sockets.

ZMQ sockets are not thread-safe, so a transfer end's control thread owns its sockets, and
other threads (the engine, pair threads, waiters) hand it frames through an inproc PUSH/PULL
pair: the control thread polls `socket` beside its network sockets.
"""

from __future__ import annotations

import threading

import zmq


class Outbox:
    def __init__(self, ctx: zmq.Context, name: str):
        address = f"inproc://{name}-{id(self)}"
        self.socket = ctx.socket(zmq.PULL)
        """The control thread's end: poll it, `recv_multipart` from it."""
        self.socket.bind(address)
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(address)
        self._lock = threading.Lock()  # makes each put whole: all ZMQ asks of sharing threads

    def put(self, frames: list[bytes]) -> None:
        """Queues frames for the control thread; from any thread; dropped once closed."""
        with self._lock:
            if not self._push.closed:
                self._push.send_multipart(frames)

    def close(self) -> None:
        with self._lock:
            self._push.close(linger=0)
        self.socket.close(linger=0)
