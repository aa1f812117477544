"""A worker's KV events on their way to the router (cache-aware routing).

The engine's prefix cache is touched only by the worker's loop thread, which moves its events
here after each turn (`collect`); the router's poll, on another thread, takes them (`take`),
so a poll never waits for a step. What the poll carries: `{"root": hex of the cache's chain
root, "reset": bool, "events": [["stored" | "removed", block name], ...]}`, in order; with
`reset` the router forgets what it knew of this worker first.
"""

from __future__ import annotations

import threading
from typing import Any

from workers.engine.prefix_cache import PrefixCache


class KvEventBuffer:
    def __init__(self, cache: PrefixCache | None):
        self._cache = cache
        self._lock = threading.Lock()
        self._events: list[list[Any]] = []
        self._reset = False

    def collect(self) -> None:
        """Loop thread: moves the cache's events since the last call here."""
        if self._cache is None:
            return
        drained = self._cache.drain_events()
        if not drained.events and not drained.reset:
            return
        with self._lock:
            if drained.reset:
                self._events, self._reset = [], True
            self._events += [[e.kind, e.block_hash] for e in drained.events]

    def republish(self) -> None:
        """Loop thread: the next take carries every block name the cache holds, with reset
        (the router's index was lost: Redis came back empty, or a router started without it)."""
        if self._cache is not None:
            self._cache.request_snapshot()
            self.collect()

    def take(self) -> dict[str, Any] | None:
        """Any thread: the events since the last take (None without a prefix cache)."""
        if self._cache is None:
            return None
        with self._lock:
            events, reset = self._events, self._reset
            self._events, self._reset = [], False
        return {"root": self._cache.root.hex(), "reset": reset, "events": events}
