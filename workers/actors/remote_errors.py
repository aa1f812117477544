"""Typed errors across Ray calls: a worker's or the router's `KvrelayError` reaches the caller
as itself, with its numbers.

Ray pickles an exception as `cls(*args)`, and our errors' constructors take their numbers
(`NoCapacity(needed_blocks, free_blocks)`) while `args` holds the message, so they do not
survive the trip. Actor wrappers raise `RemoteError(to_wire(exc))` instead (one dict of plain
values), and callers turn it back with `from_wire`.
"""

from __future__ import annotations

from typing import Any

from workers import errors
from workers.errors import KvrelayError


class RemoteError(Exception):
    """Carries one typed error's wire form through Ray (picklable: one dict argument)."""

    def __init__(self, wire: dict[str, Any]):
        super().__init__(wire)
        self.wire = wire


def to_wire(exc: KvrelayError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "fields": dict(vars(exc))}


def from_wire(wire: dict[str, Any]) -> KvrelayError:
    """The typed error again (same class, message and fields); an unknown class name (a
    newer peer) becomes a plain KvrelayError with the message."""
    cls = getattr(errors, wire["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, KvrelayError)):
        return KvrelayError(wire["message"])
    exc = cls.__new__(cls)
    Exception.__init__(exc, wire["message"])
    exc.__dict__.update(wire["fields"])
    return exc
