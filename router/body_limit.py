"""The request body size limit (`--max-request-bytes`), enforced before anything parses a body.

An ASGI middleware in front of the whole gateway. A request whose Content-Length is over the
limit gets 413 at once, its body never read (the HTTP server frames a body by its
Content-Length, so a request cannot carry more than it declares). A body without a length (a
chunked upload) is counted as it arrives: 413 as soon as the count passes the limit, and
otherwise handed on whole to the app. Either way no body over the limit is ever held in
memory, parsed as JSON or validated, so one client cannot stall or bloat the gateway with a
huge body.

The default, 4 MiB, holds a prompt far longer than today's context windows: 128k tokens are
~0.5 MB of English text, or ~0.9 MB as a JSON list of token ids (vLLM itself sets no limit;
TGI's `--payload-limit` is 2 MB). Raise it for million-token contexts.
"""

from __future__ import annotations

from typing import Any

from router import http_errors

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    """`app.add_middleware(BodyLimit, max_bytes=N)`; `max_bytes` 0 turns the limit off."""

    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.max_bytes:
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None:
            if length > self.max_bytes:
                await self._refuse(scope, receive, send, f"{length} bytes")
            else:
                await self.app(scope, receive, send)
            return
        body = await self._read_counted(receive)
        if body is None:
            await self._refuse(scope, receive, send, "more bytes")
        else:
            await self.app(scope, _replay(body, receive), send)

    async def _read_counted(self, receive: Any) -> bytes | None:
        """The whole body; None once it passes the limit or when the client left (then the
        413 goes nowhere: the server drops what is sent to a closed connection)."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, scope: Scope, receive: Any, send: Any, size: str) -> None:
        message = (f"request body of {size} exceeds the limit of {self.max_bytes} bytes "
                   f"(--max-request-bytes)")
        response = http_errors.from_http_status(413, message).response()
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses such a request before we see it
    return None


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that gives the app the body already read, then the real messages
    (the disconnect the gateway waits on)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
