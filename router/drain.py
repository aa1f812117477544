"""Graceful shutdown at the gateway: stop admitting, let what is in flight finish, end the rest.

`Drain` knows every request in flight at one gateway (RequestFlow adds each when it admits
it and discards it when it ends) and the aborts it sent. Once `shut_down` begins,
`check_open()` raises `ShuttingDown`, a 503 with Retry-After, so clients and load balancers
go elsewhere.
`shut_down(timeout)` closes, waits until nothing is in flight or the timeout, then cuts
each request still in flight: its receive loop reads `CUT` from its queue and raises
`ShuttingDown`, so a stream ends with an error event and [DONE], a waiting client gets a
503, and RequestFlow aborts the request on the backend; the aborts are awaited too, so the
KV of every request is free when `shut_down` returns.

One event loop, no locks. cluster/graceful.py drives it on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from router import http_errors

log = logging.getLogger(__name__)

# After the cut: how long the ended requests get to send their last event and be aborted.
_CUT_GRACE_S = 2.0

CUT = None
"""Put into a request's output queue by `cut()`: no chunk ever is None."""


class ShuttingDown(Exception):
    """The gateway is shutting down: a new request is refused, or one in flight is ended."""

    def __init__(self, message: str = "the server is shutting down; retry on another replica"):
        super().__init__(message)

    def http_error(self) -> http_errors.HttpError:
        return http_errors.from_http_status(503, str(self))


class Drain:
    """The requests in flight at one gateway and whether it still admits new ones."""

    def __init__(self) -> None:
        self.closed = False
        self._calls: dict[str, Any] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborts: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._calls)

    def check_open(self) -> None:
        if self.closed:
            raise ShuttingDown()

    def add(self, request_id: str, call: Any) -> None:
        """`call.queue` is the request's output queue (router/gateway_call.py)."""
        self._calls[request_id] = call
        self._idle.clear()

    def discard(self, request_id: str) -> None:
        self._calls.pop(request_id, None)
        if not self._calls:
            self._idle.set()

    def track_abort(self, task: asyncio.Task) -> None:
        """A backend abort under way; `shut_down` waits for it."""
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def shut_down(self, timeout_s: float, hurry: asyncio.Event | None = None) -> None:
        """Stops admission, waits up to `timeout_s` (or until `hurry` is set) for the requests
        in flight, ends the rest and waits for every abort (see the module docstring)."""
        self.closed = True
        log.info("draining %d requests in flight (up to %.0f s)", len(self._calls), timeout_s)
        if not await self.wait(timeout_s, hurry):
            log.warning("ending %d requests still in flight", self.cut())
            await self.wait(_CUT_GRACE_S)
        if self._aborts:
            await asyncio.wait(set(self._aborts), timeout=_CUT_GRACE_S)

    async def wait(self, timeout_s: float, hurry: asyncio.Event | None = None) -> bool:
        """True once nothing is in flight; False at `timeout_s` or when `hurry` is set."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return self._idle.is_set()

    def cut(self) -> int:
        """Ends every request in flight (see the module docstring); returns how many."""
        for call in self._calls.values():
            call.queue.put_nowait(CUT)
        return len(self._calls)
