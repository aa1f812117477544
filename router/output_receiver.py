"""The gateway's one ZMQ PULL socket, demultiplexing OutputChunks by request id.

Workers PUSH msgpack-encoded `OutputChunk`s (workers/protocol.py) to `address`; a single
asyncio task reads them and puts each into the queue registered for its request id. One
socket per gateway process (not per request) keeps the number of connections per worker
constant however many requests are in flight.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import zmq
import zmq.asyncio

from workers.protocol import OutputChunk, decode

log = logging.getLogger(__name__)


class OutputReceiver:
    """Binds a PULL socket on `host` (`port` 0: a free port) and routes chunks by request id.

    `address` is what workers connect to: `advertise_host` if given; for a wildcard `host`
    (0.0.0.0), this machine's address, since workers cannot connect to a wildcard.

    Lifecycle: `await start()` inside the serving event loop, `await stop()` at shutdown.
    Callers `register(request_id)` BEFORE submitting the request (so no chunk can arrive for
    an unknown id) and `unregister` once they are done with it. Chunks for ids not registered
    (late chunks of aborted requests) are dropped and counted in `dropped`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None):
        self._host = host
        self._port = port
        self._advertise = advertise_host or _advertised(host)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue[OutputChunk]] = {}
        self.address = ""
        self.received = 0
        self.dropped = 0

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self._port == 0:
            port = self._sock.bind_to_random_port(f"tcp://{self._host}")
        else:
            self._sock.bind(f"tcp://{self._host}:{self._port}")
            port = self._port
        self.address = f"tcp://{self._advertise}:{port}"
        self._task = asyncio.create_task(self._pump(), name="output-receiver")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def register(self, request_id: str) -> asyncio.Queue[OutputChunk]:
        """A fresh queue that will receive every chunk of `request_id`, in arrival order."""
        queue: asyncio.Queue[OutputChunk] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    @property
    def num_registered(self) -> int:
        return len(self._queues)

    async def _pump(self) -> None:
        assert self._sock is not None
        while True:
            data = await self._sock.recv()
            try:
                chunk = decode(data)
            except Exception:  # a malformed message must not kill the one receiver
                log.exception("undecodable message of %d bytes on %s", len(data), self.address)
                continue
            if not isinstance(chunk, OutputChunk):
                log.error("unexpected %s on the output socket", type(chunk).__name__)
                continue
            self.received += 1
            queue = self._queues.get(chunk.request_id)
            if queue is None:
                self.dropped += 1
                continue
            queue.put_nowait(chunk)


def _advertised(host: str) -> str:
    if host in ("0.0.0.0", "*", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return host
