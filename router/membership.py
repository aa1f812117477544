"""Which workers the router serves with: RouterCore's collaborator for worker health.

A monitor task checks every worker each `poll_interval_s` (`report`: alive, incarnation, free
blocks; the news address rides along, router/worker_news.py). A worker that answers is
admitted (its KV pairs set up, router/kv_pairs.py); one that stops answering, whose engine
loop stopped, or that answers as a new incarnation (Ray restarted it) is lost: `on_lost`
(RouterCore) lets its requests go on, migrate or end. A restarted worker is admitted again at
its next answer. A second task hands each worker's pushed news to `on_news`.

After each round of checks, `after_poll` runs (RouterCore: publish and read the shared loads),
then, if the control plane says its KV index lost facts (`take_resync`: Redis came back,
perhaps empty; a router started with an empty index), every ready worker is asked to
re-publish its cached blocks, which its next report carries. A worker registered here starts
from the incarnation the control plane last heard of it (a restarted router rebuilds its view
from Redis), so a worker that restarted while no router watched is still seen as restarted
(its stale index dropped).

Workers that come and go (`watch`, with a shared control plane): a third task rescans the
cluster's live workers every `rescan_interval_s` (RouterConfig; a periodic rescan, not a
Redis-driven watch: the workers write nothing to Redis; their heartbeats there are what
routers polled, so a worker no router polled yet, one started after this router or restarted
under a new actor, exists only as a named Ray actor, cluster/control_plane/discovery.py;
and keyspace notifications are a server setting we cannot count on). `sync` applies one
scan: a new worker is registered (its next answer admits it and sets up its KV pairs,
router/kv_pairs.py, as at start); a worker found under a new actor gets the new handle (its
next answer, a new incarnation, is a restart: lost, then admitted again); a worker no longer
found is lost at once and no longer checked, and forgotten at the next scan that still
misses it (by then the calls in flight to it have failed and its requests moved on); found
again, it is checked and admitted again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from router.control_plane import ControlPlane
from router.kv_pairs import KvPairs
from router.router_state import RouterConfig, WorkerState
from router.worker_client import WorkerClient
from router.worker_handle import WorkerGone, WorkerHandle
from router.worker_news import NewsReceiver
from workers.errors import NoReadyWorker
from workers.protocol import WorkerNews, WorkerReport

log = logging.getLogger(__name__)

OnLost = Callable[[str, list[str]], Awaitable[None]]
OnNews = Callable[[WorkerNews], Awaitable[None]]
AfterPoll = Callable[[], None]
Found = dict[str, tuple[str, Any, WorkerHandle]]
"""One rescan: worker_id -> (role, identity (equal while it is the same actor), handle)."""
Find = Callable[[], Awaitable[Found]]


class Membership:
    """Registers, checks, admits and loses workers; see the module docstring."""

    def __init__(self, config: RouterConfig, workers: dict[str, WorkerState],
                 control_plane: ControlPlane, worker: Callable[[str], WorkerClient],
                 on_lost: OnLost, on_news: OnNews, after_poll: AfterPoll | None = None):
        self.config = config
        self.workers = workers
        self.control_plane = control_plane
        self.prefix_stats: dict[str, dict[str, int]] = {}
        """Per worker, its prefix cache's lookups (`queries`, `hits`) at its last report."""
        self.ranks: dict[str, list[dict]] = {}
        """Per worker admitted, its ranks' facts from its `ready()` (cluster/rank_metrics.py):
        learnt by the router, so a worker a rescan found has them as those of start-up do."""
        self.kv_events_applied: Counter[str] = Counter()
        """Per worker, KV events applied to the control plane."""
        self._worker = worker
        self._on_lost = on_lost
        self._on_news = on_news
        self._after_poll = after_poll
        self._heard: dict[str, dict] | None = None
        """The control plane's heartbeats when the first worker was registered."""
        self.pairs = KvPairs(workers, worker)
        self.news = NewsReceiver(config.news_host)
        self._tasks: list[asyncio.Task] = []
        self._find: Find | None = None
        self._identity: dict[str, Any] = {}
        """Per worker found by a rescan, which actor it was."""
        self._missing: set[str] = set()
        """Workers the last rescan did not find (lost; forgotten if the next misses them)."""

    def watch(self, find: Find) -> None:
        """Rescans the cluster's workers with `find` every `config.rescan_interval_s` once
        started."""
        self._find = find

    def add(self, worker_id: str, role: str, handle: WorkerHandle) -> None:
        """Registers a worker; it takes requests once it answered a health check."""
        if self._heard is None:
            self._heard = self.control_plane.workers()
        heard = self._heard.get(worker_id, {})
        incarnation = str(heard.get("incarnation", "")) if heard.get("role") == role else ""
        self.workers[worker_id] = WorkerState(handle, role, incarnation=incarnation)

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._monitor_loop()),
                           loop.create_task(self._news_loop())]
            if self._find is not None:
                self._tasks.append(loop.create_task(self._watch_loop()))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()  # a no-op for tasks their loop already ended
        self._tasks = []
        self.news.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Checks until every registered worker answered once (or raises NoReadyWorker)."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.poll_all()
            waiting = [w for w in self.workers.values() if not w.ready]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise NoReadyWorker(waiting[0].role, len(self.workers))
            await asyncio.sleep(self.config.poll_interval_s)

    async def poll_all(self) -> None:
        """Checks every registered worker but those the last rescan missed (lost, left)."""
        await asyncio.gather(*(self._check(wid) for wid in list(self.workers)
                               if wid not in self._missing))

    async def sync(self, found: Found) -> None:
        """Applies one rescan of the cluster's live workers (see the module docstring)."""
        new = [wid for wid in found if wid not in self.workers]
        if new:
            self._heard = None  # registered from the heartbeats of now
        for worker_id, (role, identity, handle) in found.items():
            self._missing.discard(worker_id)
            worker = self.workers.get(worker_id)
            if worker is None:
                log.info("worker %s (%s) found: registered", worker_id, role)
                self.add(worker_id, role, handle)
            elif self._identity.get(worker_id) != identity:
                worker.handle = handle  # the same actor, or its successor under the name
            self._identity[worker_id] = identity
        for worker_id in [wid for wid in self.workers if wid not in found]:
            if worker_id not in self._missing:
                self._missing.add(worker_id)
                await self.lose(worker_id, "its actor is gone from the cluster")
            elif not self.workers[worker_id].ready and not self.workers[worker_id].requests:
                self._forget(worker_id)

    def _forget(self, worker_id: str) -> None:
        log.info("worker %s (%s) left the cluster: forgotten", worker_id,
                 self.workers[worker_id].role)
        del self.workers[worker_id]
        self._missing.discard(worker_id)
        self._identity.pop(worker_id, None)
        self.prefix_stats.pop(worker_id, None)
        self.ranks.pop(worker_id, None)
        self.kv_events_applied.pop(worker_id, None)

    async def lose(self, worker_id: str, why: str) -> None:
        """Drops a worker: its requests continue elsewhere if they can, else end clearly."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return  # forgotten meanwhile (a call to it failed late)
        if worker.ready:
            log.warning("worker %s (%s) lost: %s", worker_id, worker.role, why)
        worker.ready = False
        self.control_plane.drop_worker(worker_id)
        request_ids = list(worker.requests)
        worker.requests.clear()
        await self._on_lost(worker_id, request_ids)

    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self.poll_all()
                if self._after_poll is not None:
                    self._after_poll()
                await self._resync()
            except Exception:  # the monitor must outlive any one bad check
                log.exception("router health check failed")
            await asyncio.sleep(self.config.poll_interval_s)

    async def _watch_loop(self) -> None:
        assert self._find is not None
        while True:
            await asyncio.sleep(self.config.rescan_interval_s)
            try:
                await self.sync(await self._find())
            except Exception:  # a failed scan (Ray's GCS busy) changes nothing; try again
                log.exception("rescanning the cluster's workers failed")

    async def _resync(self) -> None:
        """If the control plane's index lost facts: every ready worker re-publishes."""
        why = self.control_plane.take_resync()
        if why is None:
            return
        ready = [wid for wid, w in self.workers.items() if w.ready]
        log.warning("%s: asking %d workers to re-publish their cached KV blocks (the KV "
                    "index is rebuilt from their next reports)", why, len(ready))
        await asyncio.gather(*(self._republish(wid) for wid in ready))

    async def _republish(self, worker_id: str) -> None:
        try:
            await self._worker(worker_id).republish_kv()
        except WorkerGone:
            pass  # lost: a restarted worker's cache starts empty

    async def _news_loop(self) -> None:
        while True:
            news = await self.news.next()
            worker = self.workers.get(news.worker_id)
            if worker is None or news.incarnation != worker.incarnation:
                continue  # of a worker (incarnation) the router no longer serves
            try:
                await self._on_news(news)
            except Exception:  # one bad news must not stop the others
                log.exception("news %s failed", news)

    async def _check(self, worker_id: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return  # forgotten since this round of checks began
        try:
            report = await asyncio.wait_for(self._worker(worker_id).report(self.news.bind()),
                                            timeout=self.config.poll_timeout_s)
        except WorkerGone:
            return  # the call dropped it already
        except asyncio.TimeoutError:
            await self.lose(worker_id, "its health check timed out")
            return
        if not report.alive:
            await self.lose(worker_id, "its engine loop stopped")
            return
        if worker.incarnation and report.incarnation != worker.incarnation:
            await self.lose(worker_id, "restarted")
        self._record(worker_id, worker.role, report)
        admitted = not worker.ready
        if admitted:
            log.info("worker %s (%s) admitted", worker_id, worker.role)
        worker.incarnation, worker.ready = report.incarnation, True
        worker.kv_address = report.kv_address
        if admitted:
            await self.pairs.introduce(worker_id)
            await self._learn_ranks(worker_id)
        worker.free_blocks, worker.total_blocks = report.free_blocks, report.total_blocks

    async def _learn_ranks(self, worker_id: str) -> None:
        """An admitted worker's ranks (a restarted one may come back of another shape); for
        /metrics only, so a failure is logged and changes nothing else."""
        try:
            self.ranks[worker_id] = (await self._worker(worker_id).ready()).get("ranks", [])
        except WorkerGone:
            pass  # lost meanwhile: admitted again, and asked again, when it answers
        except Exception:  # e.g. a TP rank that did not answer in time
            log.exception("worker %s: its ranks (for /metrics) are unknown", worker_id)

    def _record(self, worker_id: str, role: str, report: WorkerReport) -> None:
        """A report's facts into the control plane (heartbeat, load, KV events)."""
        self.control_plane.heartbeat(worker_id, {
            "role": role, "incarnation": report.incarnation, "free_blocks": report.free_blocks,
            "total_blocks": report.total_blocks, "num_live": report.num_live})
        if report.kv_events is not None:
            self.control_plane.apply_kv_events(worker_id, report.kv_events)
            self.kv_events_applied[worker_id] += len(report.kv_events["events"])
        if report.prefix_cache is not None:
            self.prefix_stats[worker_id] = report.prefix_cache

    def health(self) -> dict:
        roles: dict[str, dict[str, int]] = {}
        for worker in self.workers.values():
            counts = roles.setdefault(worker.role, {"ready": 0, "known": 0})
            counts["known"] += 1
            counts["ready"] += int(worker.ready)
        return roles
