"""Which worker holds which cached KV block: the router's index for cache-aware routing.

Workers publish KV events (a block name stored or removed, workers/actors/kv_event_buffer.py)
in their polls; the router applies them here and asks, per request, how many leading blocks
of its prompt each candidate holds (`overlap`). Block names are the engine's hash chain
(workers/engine/prefix_cache.py) from each worker's root, so the router names a prompt's
blocks exactly as the worker that cached them did.

`KvIndex` is the interface; `MemoryKvIndex` (this file) is the default, one per router,
inside router/control_plane.py's MemoryControlPlane. cluster/control_plane/ keeps the same
index in Redis, shared by every router replica and surviving a router's restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from workers.engine.prefix_cache import block_hashes


class KvIndex(Protocol):
    num_events_applied: int

    def apply(self, worker_id: str, news: dict[str, Any]) -> None:
        """Applies a poll's `kv_events` of `worker_id` (root, reset, events)."""
        ...

    def drop_worker(self, worker_id: str) -> None:
        """Forgets everything `worker_id` held (lost or restarted: its cache is gone)."""
        ...

    def overlap(self, token_ids: list[int], block_size: int,
                worker_ids: Iterable[str]) -> dict[str, int]:
        """Per worker, how many leading full blocks of `token_ids` it holds (absent: 0)."""
        ...


def leading_held(names: list[bytes], holds) -> int:
    """How many of `names`, from the first, `holds(name)` is true for."""
    count = 0
    for name in names:
        if not holds(name):
            break
        count += 1
    return count


class MemoryKvIndex:
    """The index in this process: block name -> workers, worker -> names and its root."""

    def __init__(self) -> None:
        self._holders: dict[bytes, set[str]] = {}
        self._held: dict[str, set[bytes]] = {}
        self._roots: dict[str, bytes] = {}
        self.num_events_applied = 0

    def apply(self, worker_id: str, news: dict[str, Any]) -> None:
        if news.get("reset"):
            self.drop_worker(worker_id)
        self._roots[worker_id] = bytes.fromhex(news["root"])
        held = self._held.setdefault(worker_id, set())
        for kind, name in news["events"]:
            if kind == "stored":
                held.add(name)
                self._holders.setdefault(name, set()).add(worker_id)
            else:
                held.discard(name)
                holders = self._holders.get(name)
                if holders is not None:
                    holders.discard(worker_id)
                    if not holders:
                        del self._holders[name]
        self.num_events_applied += len(news["events"])

    def drop_worker(self, worker_id: str) -> None:
        for name in self._held.pop(worker_id, set()):
            holders = self._holders.get(name)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del self._holders[name]

    def overlap(self, token_ids: list[int], block_size: int,
                worker_ids: Iterable[str]) -> dict[str, int]:
        by_root: dict[bytes, list[bytes]] = {}
        found = {}
        for worker_id in worker_ids:
            root = self._roots.get(worker_id)
            held = self._held.get(worker_id)
            if root is None or not held:
                continue
            if root not in by_root:
                by_root[root] = block_hashes(root, token_ids, block_size)
            found[worker_id] = leading_held(by_root[root], held.__contains__)
        return found
