"""The router: the one owner of every request in flight, a thin shell around its lifecycle.

`RouterCore` is plain asyncio code over `WorkerHandle`s (a Ray actor or an in-process object,
router/worker_handle.py), so it runs in tests without Ray. Each request's life is a pure state
machine (router/lifecycle.py): the core feeds it events (placement, worker news, a lost
worker, the client leaving) and carries out the actions it returns (tell a worker to let go,
write the final chunk, migrate). KV pairs between prefill and decode workers are
router/kv_pairs.py's. Placement (router/placement.py) picks a decode worker that reserves
blocks, then a prefill worker that computes and ships the KV, or one worker for the whole
request. A monitor task polls every worker: the poll is the liveness ping and carries the
workers' news. A worker that stops answering is dropped; its requests go on where they can (a
prefill worker died after its KV landed on the decode worker), migrate to a live worker
(router/migration.py) or else end with a clear error chunk. A worker that answers again (Ray
restarted it: a new incarnation) is admitted again. Workers are told which placement
(`GenerateRequest.attempt_id`) to let go of, and their news names its attempt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter

from router.control_plane import ControlPlane, MemoryControlPlane
from router.kv_pairs import KvPairs
from router.lifecycle import (
    Abort,
    Action,
    ClientGone,
    DeadlinePassed,
    Event,
    Failed,
    Finished,
    FirstToken,
    IllegalEvent,
    KvLanded,
    LostWorker,
    Migrate,
    Phase,
    RequestLife,
    SendFinal,
)
from router.migration import Migration
from router.placement import Placement
from router.policies import blocks_needed, make_policy
from router.router_state import InFlight, RouterConfig, WorkerState
from router.worker_client import WorkerClient
from router.worker_handle import WorkerGone, WorkerHandle
from workers.actors.output_sender import OutputSender
from workers.engine.sampling_params import SamplingParams
from workers.errors import KvrelayError, NoReadyWorker, QueueFull
from workers.protocol import GenerateRequest, OutputChunk, WorkerEvent

log = logging.getLogger(__name__)


_NEWS = {WorkerEvent.SENDING: FirstToken, WorkerEvent.SHIPPED: KvLanded,
         WorkerEvent.FINISHED: Finished, WorkerEvent.FAILED: Failed}
"""A worker's news about a request -> the lifecycle event it is."""


class RouterCore:
    """Routes requests over registered workers; see the module docstring."""

    def __init__(self, config: RouterConfig, control_plane: ControlPlane | None = None):
        self.config = config
        self.control_plane: ControlPlane = control_plane or MemoryControlPlane()
        """Heartbeats, loads and who caches which KV blocks (cache-aware routing); in
        Redis when router replicas share it (router/control_plane.py)."""
        self._prefix_stats: dict[str, dict[str, int]] = {}
        self._kv_events_applied: Counter[str] = Counter()
        self.workers: dict[str, WorkerState] = {}
        self.requests: dict[str, InFlight] = {}
        self.sender = OutputSender()
        policies = {
            "prefill": make_policy(config.prefill_policy),
            "decode": make_policy(config.decode_policy),
            "colocated": make_policy(config.colocated_policy),
        }
        self.placement = Placement(config, self.workers, self.requests, policies, self.worker,
                                   self._took, self._cached_tokens)
        self.migration = Migration(self.sender, self.placement, self._apply, config.block_size)
        self.pairs = KvPairs(self.workers, self.worker)
        self._monitor: asyncio.Task | None = None
        self.num_finished = 0
        self.num_failed = 0
        self.aborted_in_phase: Counter[str] = Counter()

    # ---- membership ---------------------------------------------------------------------

    def add_worker(self, worker_id: str, role: str, handle: WorkerHandle) -> None:
        """Registers a worker; it takes requests once a poll has answered."""
        self.workers[worker_id] = WorkerState(handle, role)

    @property
    def started(self) -> bool:
        return self._monitor is not None

    def start(self) -> None:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        self.sender.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Polls until every registered worker answered once (or raises NoReadyWorker)."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.poll_all()
            waiting = [w for w in self.workers.values() if not w.ready]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise NoReadyWorker(waiting[0].role, len(self.workers))
            await asyncio.sleep(self.config.poll_interval_s)

    # ---- requests -----------------------------------------------------------------------

    async def submit(self, request: GenerateRequest) -> None:
        """Places `request` on workers; raises QueueFull, NoReadyWorker, NoCapacity or the
        decode worker's typed refusal (e.g. PromptTooLong)."""
        if len(self.requests) >= self.config.max_queue:
            raise QueueFull(1.0, len(self.requests), self.config.max_queue)
        params = SamplingParams.from_dict(request.sampling)
        num_prompt = len(request.prompt_token_ids)
        entry = InFlight(
            request,
            RequestLife(request.request_id, max_migrations=self.config.max_migrations),
            tokens=num_prompt + params.max_tokens,
            blocks=blocks_needed(num_prompt, self.config.block_size),
        )
        self.requests[request.request_id] = entry
        try:
            await self.placement.place(entry)
        except asyncio.CancelledError:
            # The caller gave up while placement waited (Ray cancels this call when the
            # gateway stops awaiting it): an abort in this phase, whichever of it and the
            # gateway's abort comes first; what placement took so far lets go.
            if self.requests.get(request.request_id) is entry:
                self.aborted_in_phase[entry.life.phase.value] += 1
                await self._apply(entry, ClientGone())
            self._forget(request.request_id)
            raise
        except BaseException:
            self._forget(request.request_id)
            raise

    async def resume(self, request: GenerateRequest) -> None:
        """The gateway's continuation of a migrating request (router/migration.py)."""
        await self.migration.resume(self.requests.get(request.request_id), request)

    async def abort(self, request_id: str, deadline_s: float | None = None) -> None:
        """Ends a request wherever it is (the client left, or its deadline of `deadline_s`
        passed); its blocks free on every worker that holds it."""
        entry = self.requests.get(request_id)
        if entry is None:
            return
        self.aborted_in_phase[entry.life.phase.value] += 1
        await self._apply(entry, ClientGone() if deadline_s is None else
                          DeadlinePassed(deadline_s))

    async def _apply(self, entry: InFlight, event: Event) -> bool:
        """Feeds one event to the request's life and carries out its actions; False if the
        life refused it. The request leaves the table at once when its life ends (before any
        await), so placement and later news see it gone."""
        life = entry.life
        holders = set(life.holders)
        try:
            actions = life.apply(event)
        except IllegalEvent as err:
            log.debug("%s", err)
            return False
        for worker_id in holders - life.holders:
            if worker_id in self.workers:
                self.workers[worker_id].requests.discard(entry.request_id)
        if life.phase.terminal:
            self._forget(entry.request_id)
            self.num_finished += life.phase is Phase.FINISHED
            self.num_failed += life.phase is Phase.FAILED
        await self._act(entry, actions)
        return True

    async def _act(self, entry: InFlight, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Abort):
                await self.worker(action.worker).abort_quietly(entry.request.attempt_id)
            elif isinstance(action, SendFinal):
                self._send_final(entry, action.reason, action.error)
            elif isinstance(action, Migrate):
                self.migration.begin(entry, action)

    async def _took(self, entry: InFlight, request: GenerateRequest, worker_id: str,
                    event: Event) -> bool:
        """Placement: `worker_id` took `request` (one attempt). False if the life refused
        it (the request ended or migrated meanwhile): the worker is told to let go."""
        if await self._apply(entry, event):
            return True
        if worker_id not in entry.life.holders:
            self.workers[worker_id].requests.discard(entry.request_id)
        await self.worker(worker_id).abort_quietly(request.attempt_id)
        return False

    def _forget(self, request_id: str) -> InFlight | None:
        entry = self.requests.pop(request_id, None)
        for worker in self.workers.values():
            worker.requests.discard(request_id)
        return entry

    # ---- talking to workers -------------------------------------------------------------

    def worker(self, worker_id: str) -> WorkerClient:
        """Typed calls to `worker_id` (router/worker_client.py)."""
        return WorkerClient(worker_id, functools.partial(self._call, worker_id))

    async def _call(self, worker_id: str, method: str, *args):
        """Calls a worker; a dead one is marked not ready and raises WorkerGone."""
        worker = self.workers[worker_id]
        try:
            return await worker.handle.call(method, *args)
        except WorkerGone:
            await self._lose(worker_id, "call failed")
            raise

    def _send_final(self, entry: InFlight, reason: str, error: KvrelayError | None = None):
        self.sender.send(
            entry.request.output_address,
            OutputChunk(
                request_id=entry.request.request_id,
                finished=True,
                finish_reason=reason,
                error=str(error) if error else None,
                error_type=type(error).__name__ if error else None,
                num_prompt_tokens=len(entry.request.prompt_token_ids),
                worker_id="router",
                attempt=entry.life.migrations,
            ),
        )

    # ---- monitoring ---------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self.poll_all()
            except Exception:  # the monitor must outlive any one bad poll
                log.exception("router poll failed")
            await asyncio.sleep(self.config.poll_interval_s)

    async def poll_all(self) -> None:
        await asyncio.gather(*(self._poll(wid) for wid in list(self.workers)))

    async def _poll(self, worker_id: str) -> None:
        worker = self.workers[worker_id]
        try:
            news = await asyncio.wait_for(
                worker.handle.call("poll"), timeout=self.config.poll_timeout_s
            )
        except (WorkerGone, asyncio.TimeoutError):
            await self._lose(worker_id, "poll failed")
            return
        if not news["alive"]:
            await self._lose(worker_id, "its engine loop stopped")
            return
        if worker.incarnation and news["incarnation"] != worker.incarnation:
            await self._lose(worker_id, "restarted")
        self._record(worker_id, worker.role, news)
        admitted = not worker.ready
        if admitted:
            log.info("worker %s (%s) admitted", worker_id, worker.role)
        worker.incarnation, worker.ready = news["incarnation"], True
        worker.kv_address = news.get("kv_address")
        if admitted:
            await self.pairs.introduce(worker_id)
        worker.free_blocks, worker.total_blocks = news["free_blocks"], news["total_blocks"]
        for request_id, attempt, event in news["events"]:
            await self._on_event(worker_id, request_id, attempt, event)

    def _record(self, worker_id: str, role: str, news: dict) -> None:
        """A poll's facts into the control plane (heartbeat, load, KV events)."""
        self.control_plane.heartbeat(worker_id, {
            "role": role, "incarnation": news["incarnation"], "free_blocks": news["free_blocks"],
            "total_blocks": news["total_blocks"], "num_live": news.get("num_live", 0)})
        if news.get("kv_events") is not None:
            self.control_plane.apply_kv_events(worker_id, news["kv_events"])
            self._kv_events_applied[worker_id] += len(news["kv_events"]["events"])
        if news.get("prefix_cache") is not None:
            self._prefix_stats[worker_id] = news["prefix_cache"]

    async def _on_event(self, worker_id: str, request_id: str, attempt: int,
                        news: str) -> None:
        """A worker's news about one attempt of a request (WorkerEvent)."""
        entry = self.requests.get(request_id)
        if entry is not None:
            await self._apply(entry, _NEWS[WorkerEvent(news)](worker_id, attempt=attempt))

    async def _lose(self, worker_id: str, why: str) -> None:
        """Drops a worker: its requests continue elsewhere if they can, else end clearly."""
        worker = self.workers[worker_id]
        if worker.ready:
            log.warning("worker %s (%s) lost: %s", worker_id, worker.role, why)
        worker.ready = False
        self.control_plane.drop_worker(worker_id)
        lost = [self.requests[r] for r in worker.requests if r in self.requests]
        worker.requests.clear()
        landed = await self.pairs.landed(worker_id, lost)
        for entry in lost:
            await self._apply(entry, LostWorker(worker_id, entry.request.attempt_id in landed))

    def _cached_tokens(self, request: GenerateRequest, worker_ids: list[str]) -> dict[str, int]:
        """Placement's view of the KV index, in tokens."""
        block_size = self.config.block_size
        known = [*request.prompt_token_ids, *request.output_token_ids]
        blocks = self.control_plane.overlap(known, block_size, worker_ids)
        return {wid: n * block_size for wid, n in blocks.items()}

    # ---- introspection ------------------------------------------------------------------

    def health(self) -> dict:
        roles: dict[str, dict[str, int]] = {}
        for worker in self.workers.values():
            counts = roles.setdefault(worker.role, {"ready": 0, "known": 0})
            counts["known"] += 1
            counts["ready"] += int(worker.ready)
        return {"workers": roles, "in_flight": len(self.requests),
                "control_plane": self.control_plane.stats()}

    def worker_metrics(self) -> list[dict]:
        """One entry per worker, then one for the router itself (worker_id 'router': its
        control plane's KV events applied, health and Redis round trips)."""
        workers = [
            {"worker_id": wid, "role": w.role, "ready": w.ready, "incarnation": w.incarnation,
             **self.placement.load(wid).__dict__, **self._prefix_metrics(wid),
             "kv_events_applied": self._kv_events_applied[wid]}
            for wid, w in self.workers.items()
        ]
        plane = self.control_plane.stats()
        router = {key: value for key, value in plane.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return [*workers, {"worker_id": "router", "role": "router",
                           "control_plane_healthy": int(plane["healthy"]), **router}]

    def _prefix_metrics(self, worker_id: str) -> dict[str, float]:
        """vLLM's names: prefix_cache_queries / prefix_cache_hits (tokens) and the rate."""
        stats = self._prefix_stats.get(worker_id)
        if stats is None:
            return {}
        return {"prefix_cache_queries": stats["queries"], "prefix_cache_hits": stats["hits"],
                "prefix_cache_hit_rate": stats["hits"] / max(1, stats["queries"])}
