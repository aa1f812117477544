"""Workers' news at the router: one ZMQ PULL socket that every worker PUSHes `WorkerNews`
(workers/protocol.py) to as it happens (token 1 out, KV landed, finished, failed), so the
router learns a request's progress without polling for it. The address travels with every
health check (`WorkerClient.report`), so a restarted worker, or a restarted router, finds
the other with no extra step; until a worker has it, that worker has no request to tell about.
A worker tells every router that checked it lately; each ignores news of requests it does not
own.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from workers.protocol import WorkerNews, decode

log = logging.getLogger(__name__)


class NewsReceiver:
    """Binds a PULL socket on `host` (a free port) at the first `bind`; `next` waits for the
    next news. Used from one event loop."""

    def __init__(self, host: str):
        self._host = host
        self._sock: zmq.asyncio.Socket | None = None
        self.address = ""

    def bind(self) -> str:
        """The address workers push to (bound on the first call)."""
        if self._sock is None:
            # The process's shared context, never terminated here: a context of its own,
            # garbage-collected while its socket is still open (a router never closed, e.g. a
            # test that failed half-way), would block the collecting thread for good in
            # zmq_ctx_term (the socket's weak reference is cleared before the context's
            # finalizer runs, so the finalizer cannot close it first).
            self._sock = zmq.asyncio.Context.instance().socket(zmq.PULL)
            self._sock.setsockopt(zmq.LINGER, 0)
            port = self._sock.bind_to_random_port(f"tcp://{self._host}")
            self.address = f"tcp://{self._host}:{port}"
        return self.address

    async def next(self) -> WorkerNews:
        self.bind()
        assert self._sock is not None
        while True:
            data = await self._sock.recv()
            try:
                news = decode(data)
            except Exception:  # a malformed message must not stop the router's news
                log.exception("undecodable message of %d bytes on %s", len(data), self.address)
                continue
            if isinstance(news, WorkerNews):
                return news
            log.error("unexpected %s on the news socket", type(news).__name__)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
