"""The router's shared facts: which workers are alive with what load, and who caches what.

Every poll the router records a worker's heartbeat (role, incarnation, load) and applies its
KV events (router/kv_index.py); placement asks for cached-prefix overlaps. `ControlPlane` is
that interface. `MemoryControlPlane` (here) keeps it in the router's process, the default.
With `kvrelay serve --redis-url`, cluster/control_plane/redis_plane.py keeps it in Redis, so
several gateway/router replicas see one truth and a restarted router starts from it.

A control plane that cannot reach its store says so (`healthy` False, and `stats()` for
/health); meanwhile it answers "nothing cached", so routing falls back to load alone and
serving goes on. When its index may have lost facts (the store came back, empty or not; a
router started with an empty memory) `take_resync` says why, once: the router then asks its
workers to re-publish every cached block (router/membership.py).

Loads: each router publishes, per worker, the requests it has placed there and not seen end
(`share_loads`), and gets back what the other routers published within a staleness bound,
so placement counts every router's work on a worker, not only its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

from router.kv_index import MemoryKvIndex

Load = tuple[int, int]
"""(outstanding tokens, requests) one router has placed on one worker."""


class ControlPlane(Protocol):
    backend: str

    @property
    def healthy(self) -> bool:
        """False while the store cannot be reached (routing is load-only then)."""
        ...

    def heartbeat(self, worker_id: str, facts: dict[str, Any]) -> None:
        """Records that `worker_id` answered a poll now, with its role, incarnation, load."""
        ...

    def workers(self) -> dict[str, dict[str, Any]]:
        """The workers that answered recently (any router's polls), by id."""
        ...

    def apply_kv_events(self, worker_id: str, news: dict[str, Any]) -> None:
        """A poll's `kv_events` (workers/actors/kv_event_buffer.py)."""
        ...

    def drop_worker(self, worker_id: str) -> None:
        """`worker_id` is lost or restarted: its cache and heartbeat are gone."""
        ...

    def overlap(self, token_ids: list[int], block_size: int,
                worker_ids: Iterable[str]) -> dict[str, int]:
        """Per worker, how many leading full blocks of `token_ids` it caches (absent: 0)."""
        ...

    def share_loads(self, own: dict[str, Load]) -> dict[str, Load]:
        """Publishes this router's load per worker; returns, per worker, the sum of what the
        other routers published lately (absent: none; the store unreachable: {})."""
        ...

    def take_resync(self) -> str | None:
        """Why the KV index must be rebuilt from the workers (once), else None."""
        ...

    def stats(self) -> dict[str, Any]:
        """backend, healthy, routing ('cache_aware' or 'load_only'), events applied, ..."""
        ...


class MemoryControlPlane:
    """The control plane inside one router process (no replica shares it)."""

    backend = "memory"

    def __init__(self, heartbeat_ttl_s: float = 10.0):
        self.index = MemoryKvIndex()
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._beats: dict[str, dict[str, Any]] = {}
        self._resync: str | None = "the router started with an empty KV index"
        self.num_resyncs = 0

    @property
    def healthy(self) -> bool:
        return True

    def heartbeat(self, worker_id: str, facts: dict[str, Any]) -> None:
        self._beats[worker_id] = {**facts, "seen_at": time.time()}

    def workers(self) -> dict[str, dict[str, Any]]:
        oldest = time.time() - self.heartbeat_ttl_s
        return {wid: facts for wid, facts in self._beats.items() if facts["seen_at"] >= oldest}

    def apply_kv_events(self, worker_id: str, news: dict[str, Any]) -> None:
        self.index.apply(worker_id, news)

    def drop_worker(self, worker_id: str) -> None:
        self.index.drop_worker(worker_id)
        self._beats.pop(worker_id, None)

    def overlap(self, token_ids: list[int], block_size: int,
                worker_ids: Iterable[str]) -> dict[str, int]:
        return self.index.overlap(token_ids, block_size, worker_ids)

    def share_loads(self, own: dict[str, Load]) -> dict[str, Load]:
        return {}  # no other router shares this memory

    def take_resync(self) -> str | None:
        why, self._resync = self._resync, None
        self.num_resyncs += why is not None
        return why

    def stats(self) -> dict[str, Any]:
        return {"backend": self.backend, "healthy": True, "routing": "cache_aware",
                "kv_events_applied": self.index.num_events_applied,
                "resyncs": self.num_resyncs}
