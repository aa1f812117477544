"""The gateway's one ZMQ PULL socket, demultiplexing OutputChunks by request id.

Workers PUSH msgpack-encoded `OutputChunk`s (workers/protocol.py) to `address`; a single
asyncio task reads them and puts each into the queue registered for its request id. One
socket per gateway process (not per request) keeps the number of connections per worker
constant however many requests are in flight.

Up to three processes write one request's stream (the prefill worker token 1, the decode
worker the rest, the router a final chunk on abort or loss), over different connections, so
arrival order is not token order. Each chunk says where its tokens go (`index`), and the
receiver hands them over in token order: a chunk
ahead of a gap waits for it, a duplicate is dropped, and exactly one final chunk is handed
over, after which nothing more is.

Migration (router/migration.py): when the worker streaming a request is lost, the router
sends a `Resume` on this socket. The receiver knows what the client got (the token ids and
text handed over), so it hands exactly that to the request's `Resumer`, which submits the
continuation; from then on chunks of earlier attempts (a lost worker's last words) are
dropped, so the stream goes on from the next index with no duplicate and no gap.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Protocol

import zmq
import zmq.asyncio

from workers.protocol import OutputChunk, Resume, decode

log = logging.getLogger(__name__)


class Resumer(Protocol):
    """One request's side of its migrations at the gateway (router/stream_resume.py)."""

    def resume(self, resume: Resume, output_token_ids: list[int], sent_text_len: int) -> None:
        """Submits the continuation from what the client got; must not block (it runs in
        the receiver's task)."""

    def resumed(self, stall_s: float) -> None:
        """Tokens flow again after a resume, `stall_s` after the last ones before it."""


class _Ordered:
    """One request's chunks in token order (see the module doc)."""

    def __init__(self, resumer: Resumer | None) -> None:
        self.queue: asyncio.Queue[OutputChunk] = asyncio.Queue()
        self.resumer = resumer
        self.attempt = 0
        """Chunks of earlier attempts are dropped."""
        self.output_ids: list[int] = []
        """Token ids handed over, in order."""
        self.text_len = 0
        """Characters of text handed over."""
        self.last_token_at = time.monotonic()
        self.stalled_since: float | None = None
        """Set by a resume until tokens flow again."""
        self.next_index = 0
        """Index of the next output token to hand over."""
        self.waiting: dict[int, OutputChunk] = {}
        """Chunks ahead of a gap, by the index of their first token."""
        self.ended = False

    def put(self, chunk: OutputChunk) -> bool:
        """Hands over what is in order now; False if the chunk was dropped (a duplicate,
        or after the final chunk)."""
        if self.ended or chunk.attempt < self.attempt:
            return False
        if chunk.index is None:  # no place in the output (an error or abort): at once
            self._hand_over(chunk)
            return True
        start = chunk.index
        if start < self.next_index or start in self.waiting:
            return False
        self.waiting[start] = chunk
        while not self.ended and self.next_index in self.waiting:
            self._hand_over(self.waiting.pop(self.next_index))
        return True

    def resume(self, resume: Resume) -> bool:
        """Hands what the client got to the resumer; False if not resumable (ended, a
        duplicate Resume, or no resumer)."""
        if self.ended or resume.attempt <= self.attempt or self.resumer is None:
            return False
        self.attempt = resume.attempt
        self.waiting.clear()  # of the lost attempt; the continuation sends them again
        if self.stalled_since is None:
            self.stalled_since = self.last_token_at
        self.resumer.resume(resume, list(self.output_ids), self.text_len)
        return True

    def _hand_over(self, chunk: OutputChunk) -> None:
        self.queue.put_nowait(chunk)
        self.next_index += len(chunk.new_token_ids)
        self.output_ids.extend(chunk.new_token_ids)
        self.text_len += len(chunk.text_delta)
        self.ended = chunk.finished
        if chunk.new_token_ids:
            self.last_token_at = time.monotonic()
            if self.stalled_since is not None and self.resumer is not None:
                self.resumer.resumed(self.last_token_at - self.stalled_since)
            self.stalled_since = None


class OutputReceiver:
    """Binds a PULL socket on `host` (`port` 0: a free port) and routes chunks by request id.

    `address` is what workers connect to: `advertise_host` if given; for a wildcard `host`
    (0.0.0.0), this machine's address, since workers cannot connect to a wildcard.

    Lifecycle: `await start()` inside the serving event loop, `await stop()` at shutdown.
    Callers `register(request_id)` BEFORE submitting the request (so no chunk can arrive for
    an unknown id) and `unregister` once they are done with it. Chunks for ids not registered
    (late chunks of aborted requests), duplicates and chunks after the final one are dropped
    and counted in `dropped`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None):
        self._host = host
        self._port = port
        self._advertise = advertise_host or _advertised(host)
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._streams: dict[str, _Ordered] = {}
        self.address = ""
        self.received = 0
        self.dropped = 0

    async def start(self) -> None:
        # The process's shared context, never terminated here (see router/worker_news.py).
        self._sock = zmq.asyncio.Context.instance().socket(zmq.PULL)
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

    def register(self, request_id: str,
                 resumer: Resumer | None = None) -> asyncio.Queue[OutputChunk]:
        """A fresh queue that will receive the chunks of `request_id` in token order, up to
        and including exactly one final chunk; `resumer` continues it after a `Resume`."""
        stream = self._streams[request_id] = _Ordered(resumer)
        return stream.queue

    def unregister(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    @property
    def num_registered(self) -> int:
        return len(self._streams)

    async def _pump(self) -> None:
        assert self._sock is not None
        while True:
            data = await self._sock.recv()
            try:
                chunk = decode(data)
            except Exception:  # a malformed message must not kill the one receiver
                log.exception("undecodable message of %d bytes on %s", len(data), self.address)
                continue
            if isinstance(chunk, Resume):
                self._resume(chunk)
                continue
            if not isinstance(chunk, OutputChunk):
                log.error("unexpected %s on the output socket", type(chunk).__name__)
                continue
            self.received += 1
            stream = self._streams.get(chunk.request_id)
            if stream is None or not stream.put(chunk):
                self.dropped += 1


    def _resume(self, resume: Resume) -> None:
        stream = self._streams.get(resume.request_id)
        if stream is None or not stream.resume(resume):
            log.info("resume of %s (attempt %d) not taken", resume.request_id, resume.attempt)


def _advertised(host: str) -> str:
    if host in ("0.0.0.0", "*", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return host
