"""`RedisControlPlane`: router/control_plane.py's interface with its facts in Redis.

Several gateway/router replicas (e.g. two `kvrelay serve --join` gateways on one Ray cluster)
each poll the workers; whatever events one of them drains it writes here, so every replica's
KV index is the union, and a restarted router reads it back at once. Keys, all under the
cluster's name (`kvrelay:{<name>}:`, built in one place: redis_keys.py), so clusters that
share one Redis never see each other's facts:
- `held:<worker>`: SET of block names (16-byte hashes) the worker caches;
- `root:<worker>`: the worker's hash-chain root, to name a prompt's blocks as it did;
- `worker:<worker>`: HASH of its last heartbeat (role, incarnation, load, seen_at),
  expiring `heartbeat_ttl_s` after the last poll that answered;
- `load:<worker>`: HASH router id -> "tokens requests published_at" of the requests
  each router has on that worker (`share_loads`, once per poll interval); a value older than
  `load_ttl_s` is ignored and deleted (its router died or restarted: a restarted router has
  a new id, so its predecessor's requests, still running, count until then);
- `epoch`: set by the cluster's first router to publish loads; missing means Redis lost its
  state (restarted empty, or flushed).
`overlap` is one round trip: SMISMEMBER of the prompt's block names per candidate.

Redis going away must not take serving down: every call runs under short socket timeouts;
on a connection error the plane turns unhealthy (logged once, shown in /health), answers
"nothing cached" (routing is load-only) and drops writes, trying Redis again after
`retry_s`. When Redis answers again it is healthy again; the index may lack what happened
meanwhile, which costs cache hits, never correctness (a worker computes what it lacks).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis

from cluster.control_plane.redis_keys import WORKER_KINDS, RedisKeys
from router.control_plane import Load
from router.kv_index import leading_held
from workers.engine.prefix_cache import block_hashes

log = logging.getLogger(__name__)

_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class RedisControlPlane:
    backend = "redis"

    def __init__(self, url: str, cluster: str, heartbeat_ttl_s: float = 10.0,
                 timeout_s: float = 0.25, retry_s: float = 1.0, load_ttl_s: float = 2.0,
                 router_id: str | None = None):
        """`cluster`: the cluster's name (ClusterConfig.name), which every key is under."""
        self.url = url
        self.keys = RedisKeys(cluster)
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.retry_s = retry_s
        self.load_ttl_s = load_ttl_s
        self.router_id = router_id or uuid.uuid4().hex[:12]
        """This router's name in the shared loads (fresh per construction, see above)."""
        self._stale: dict[str, list[bytes]] = {}
        """Per worker, load entries found stale at the last exchange (deleted at the next)."""
        self._resync: str | None = None
        self.num_resyncs = 0
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._roots: dict[str, bytes] = {}
        self._down_since: float | None = None
        self._retry_at = 0.0
        self.num_events_applied = 0
        self.num_round_trips = 0
        self.round_trip_seconds = 0.0
        self.max_round_trip_seconds = 0.0

    # ---- health ---------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._down_since is None

    def _run(self, what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        """One round trip, timed; on a connection error: unhealthy, `default`."""
        if self._down_since is not None and time.monotonic() < self._retry_at:
            return default
        start = time.perf_counter()
        try:
            result = fn()
        except _ERRORS as exc:
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("redis at %s unreachable (%s: %s during %s): routing falls back to "
                            "load only until it answers", self.url, type(exc).__name__, exc,
                            what)
            self._retry_at = time.monotonic() + self.retry_s
            return default
        elapsed = time.perf_counter() - start
        self.num_round_trips += 1
        self.round_trip_seconds += elapsed
        self.max_round_trip_seconds = max(self.max_round_trip_seconds, elapsed)
        if self._down_since is not None:
            down_s = time.time() - self._down_since
            log.warning("redis at %s answers again after %.1f s: cache-aware routing resumes "
                        "once the workers re-publish their KV blocks", self.url, down_s)
            self._resync = f"redis at {self.url} answers again after {down_s:.1f} s"
            self._down_since = None
        return result

    def take_resync(self) -> str | None:
        why, self._resync = self._resync, None
        self.num_resyncs += why is not None
        return why

    # ---- registry --------------------------------------------------------------------------

    def heartbeat(self, worker_id: str, facts: dict[str, Any]) -> None:
        key = self.keys.worker_key("worker", worker_id)
        mapping = {k: str(v) for k, v in {**facts, "seen_at": time.time()}.items()}

        def write() -> None:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, int(self.heartbeat_ttl_s * 1000))
            pipe.execute()

        self._run("heartbeat", write)

    def workers(self) -> dict[str, dict[str, Any]]:
        def read() -> dict[str, dict[str, Any]]:
            keys = list(self._redis.scan_iter(match=self.keys.worker_pattern("worker"),
                                              count=500))
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return {self.keys.worker_id("worker", key):
                    {k.decode(): v.decode() for k, v in facts.items()}
                    for key, facts in zip(keys, pipe.execute(), strict=True) if facts}

        return self._run("workers", read, default={})

    # ---- loads ---------------------------------------------------------------------------

    def share_loads(self, own: dict[str, Load]) -> dict[str, Load]:
        now = time.time()
        epoch = self.keys.epoch
        stale, self._stale = self._stale, {}

        def exchange() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(epoch, now, nx=True)
            for worker_id, (tokens, requests) in own.items():
                key = self.keys.worker_key("load", worker_id)
                if stale.get(worker_id):
                    pipe.hdel(key, *stale[worker_id])
                pipe.hset(key, self.router_id, f"{tokens} {requests} {now}")
                pipe.pexpire(key, int(self.load_ttl_s * 1000))
            for worker_id in own:
                pipe.hgetall(self.keys.worker_key("load", worker_id))
            return pipe.execute()

        replies = self._run("share_loads", exchange)
        if replies is None:
            return {}
        if replies[0] and self._resync is None:
            self._resync = (f"redis at {self.url} holds no state of kvrelay cluster "
                            f"{self.keys.cluster!r} (new, or restarted empty)")
        return self._others(dict(zip(own, replies[-len(own):], strict=True)) if own else {}, now)

    def _others(self, published: dict[str, dict[bytes, bytes]], now: float) -> dict[str, Load]:
        """The other routers' fresh loads summed per worker; stale entries noted to delete."""
        others: dict[str, Load] = {}
        me = self.router_id.encode()
        for worker_id, entries in published.items():
            for router, value in entries.items():
                tokens, requests, published_at = value.split()
                if now - float(published_at) > self.load_ttl_s:
                    self._stale.setdefault(worker_id, []).append(router)
                elif router != me:
                    had = others.get(worker_id, (0, 0))
                    others[worker_id] = (had[0] + int(tokens), had[1] + int(requests))
        return others

    # ---- KV index ------------------------------------------------------------------------

    def apply_kv_events(self, worker_id: str, news: dict[str, Any]) -> None:
        root = bytes.fromhex(news["root"])
        self._roots[worker_id] = root
        held = self.keys.worker_key("held", worker_id)

        def write() -> None:
            pipe = self._redis.pipeline(transaction=True)
            if news.get("reset"):
                pipe.delete(held)
            pipe.set(self.keys.worker_key("root", worker_id), root)
            for kind, name in news["events"]:  # in order: stored then removed is removed
                (pipe.sadd if kind == "stored" else pipe.srem)(held, name)
            pipe.execute()
            self.num_events_applied += len(news["events"])

        self._run("apply_kv_events", write)

    def drop_worker(self, worker_id: str) -> None:
        keys = [self.keys.worker_key(kind, worker_id) for kind in WORKER_KINDS]
        self._roots.pop(worker_id, None)
        self._run("drop_worker", lambda: self._redis.delete(*keys))

    def overlap(self, token_ids: list[int], block_size: int,
                worker_ids: Iterable[str]) -> dict[str, int]:
        worker_ids = list(worker_ids)
        roots = self._known_roots(worker_ids)
        names = {root: block_hashes(root, token_ids, block_size)
                 for root in set(roots.values())}
        asked = [wid for wid in worker_ids if wid in roots and names[roots[wid]]]
        if not asked:
            return {}

        def read() -> list[list[int]]:
            pipe = self._redis.pipeline(transaction=False)
            for wid in asked:
                pipe.smismember(self.keys.worker_key("held", wid), names[roots[wid]])
            return pipe.execute()

        found = self._run("overlap", read, default=None)
        if found is None:
            return {}
        return {wid: leading_held(flags, bool) for wid, flags in zip(asked, found, strict=True)}

    def _known_roots(self, worker_ids: list[str]) -> dict[str, bytes]:
        """Each worker's chain root: remembered, else read (written by another replica)."""
        missing = [wid for wid in worker_ids if wid not in self._roots]
        if missing:
            keys = [self.keys.worker_key("root", wid) for wid in missing]
            values = self._run("roots", lambda: self._redis.mget(keys), default=None) or []
            for wid, value in zip(missing, values, strict=False):
                if value is not None:
                    self._roots[wid] = bytes(value)
        return {wid: self._roots[wid] for wid in worker_ids if wid in self._roots}

    def stats(self) -> dict[str, Any]:
        healthy = self.healthy
        return {
            "backend": self.backend, "healthy": healthy,
            "routing": "cache_aware" if healthy else "load_only",
            "error": None if healthy else f"redis at {self.url} unreachable",
            "kv_events_applied": self.num_events_applied, "resyncs": self.num_resyncs,
            "redis_round_trips": self.num_round_trips,
            "redis_round_trip_mean_s": self.round_trip_seconds / max(1, self.num_round_trips),
            "redis_round_trip_max_s": self.max_round_trip_seconds,
        }
