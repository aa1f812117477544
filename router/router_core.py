"""The router: the one owner of every request in flight, a thin shell around its lifecycle.

`RouterCore` is plain asyncio code over `WorkerHandle`s (a Ray actor or an in-process object,
router/worker_handle.py), so it runs in tests without Ray. Each request's life is a pure state
machine (router/lifecycle.py): the core feeds it events (placement, worker news, a lost
worker, the client leaving) and carries out the actions it returns (tell a worker to let go,
have the final chunk written, router/final_chunk.py; migrate, router/migration.py).
Placement (router/placement.py) picks a decode worker that reserves blocks, then a prefill
worker that computes and ships the KV, or one worker for the whole request. Workers push
their news about requests as it happens; Membership (router/membership.py) checks their
health and load, admits them (again, after Ray restarted one) and loses them; a lost worker's
requests go on where they can (a prefill worker died after its KV landed on the decode
worker), migrate to a live worker or else end with a clear error chunk. Workers are told
which placement (`GenerateRequest.attempt_id`) to let go of, and their news names its attempt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from router.control_plane import ControlPlane, MemoryControlPlane
from router.final_chunk import FinalChunks
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
from router.membership import Membership
from router.migration import Migration
from router.placement import Placement
from router.policies import blocks_needed, make_policy
from router.router_state import InFlight, RouterConfig, WorkerState
from router.worker_client import WorkerClient
from router.worker_handle import WorkerGone, WorkerHandle
from workers.actors.output_sender import OutputSender
from workers.errors import QueueFull
from workers.protocol import GenerateRequest, LetGo, WorkerEvent, WorkerNews

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
        self.workers: dict[str, WorkerState] = {}
        self.requests: dict[str, InFlight] = {}
        self.sender = OutputSender()
        policies = {
            "prefill": make_policy(config.prefill_policy),
            "decode": make_policy(config.decode_policy),
            "colocated": make_policy(config.colocated_policy),
        }
        self.placement = Placement(config, self.workers, self.requests, policies, self.worker,
                                   self._took, self._apply, self._cached_tokens,
                                   self.control_plane)
        self.migration = Migration(self.sender, self.placement, self._apply, config)
        self.finals = FinalChunks(self.sender, self.worker)
        self.membership = Membership(config, self.workers, self.control_plane, self.worker,
                                     self._lost, self._on_news, self.placement.share_loads)
        self.num_finished = 0
        self.num_failed = 0
        self.aborted_in_phase: Counter[str] = Counter()

    # ---- membership ---------------------------------------------------------------------

    def add_worker(self, worker_id: str, role: str, handle: WorkerHandle) -> None:
        """Registers a worker; it takes requests once it answered a health check."""
        self.membership.add(worker_id, role, handle)

    @property
    def started(self) -> bool:
        return self.membership.started

    def start(self) -> None:
        self.membership.start()

    async def stop(self) -> None:
        self.membership.stop()
        self.migration.close()
        self.sender.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Checks until every registered worker answered once (or raises NoReadyWorker)."""
        await self.membership.wait_ready(timeout_s)

    async def poll_all(self) -> None:
        """One health check of every worker now."""
        await self.membership.poll_all()

    # ---- requests -----------------------------------------------------------------------

    async def submit(self, request: GenerateRequest) -> None:
        """Places `request` on workers; raises QueueFull, NoReadyWorker, NoCapacity or the
        decode worker's typed refusal (e.g. PromptTooLong)."""
        if len(self.requests) >= self.config.max_queue:
            raise QueueFull(1.0, len(self.requests), self.config.max_queue)
        num_prompt = len(request.prompt_token_ids)
        entry = InFlight(
            request,
            RequestLife(request.request_id, max_migrations=self.config.max_migrations),
            tokens=num_prompt + request.sampling.max_tokens,
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
        let_go: dict[str, LetGo] = {}
        for action in actions:
            if isinstance(action, Abort):
                answer = await self.worker(action.worker).abort_quietly(
                    entry.request.attempt_id)
                if answer is not None:
                    let_go[action.worker] = answer
            elif isinstance(action, SendFinal):  # after the Aborts of the same event
                await self.finals.send(entry, action, let_go)
            elif isinstance(action, Migrate):
                self.migration.begin(entry, action)

    async def _took(self, entry: InFlight, request: GenerateRequest, worker_id: str,
                    event: Event) -> bool:
        """Placement: `worker_id` took `request` (one attempt). False if the life refused
        it (the request ended or migrated meanwhile): the worker is told to let go."""
        if await self._apply(entry, event):
            early, entry.early_news = entry.early_news, []
            for news in early:
                await self._apply(entry, news)
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

    async def _call(self, worker_id: str, method: Callable[..., Any], *args: Any) -> Any:
        """Calls a worker; a dead one is lost (Membership) and raises WorkerGone."""
        worker = self.workers[worker_id]
        try:
            return await worker.handle.call(method, *args)
        except WorkerGone:
            await self.membership.lose(worker_id, "call failed")
            raise

    # ---- what workers tell ---------------------------------------------------------------

    async def _on_news(self, news: WorkerNews) -> None:
        """A worker's news about one attempt of a request."""
        entry = self.requests.get(news.request_id)
        if entry is None:
            return
        event = _NEWS[news.event](news.worker_id, attempt=news.attempt)
        if not await self._apply(entry, event) and news.worker_id in entry.life.asked:
            # News of a worker placement is still asking (its answer is on its way): applied
            # once the worker is recorded as placed.
            entry.early_news.append(event)

    async def _lost(self, worker_id: str, request_ids: list[str]) -> None:
        """Membership lost `worker_id`, which held `request_ids`."""
        lost = [self.requests[r] for r in request_ids if r in self.requests]
        landed = await self.membership.pairs.landed(worker_id, lost)
        # Concurrently: each request's aborts and Resume go out without waiting for the
        # others' (a worker's loop takes the aborts queued together in one turn).
        await asyncio.gather(*(
            self._apply(entry, LostWorker(worker_id, entry.request.attempt_id in landed))
            for entry in lost))

    def _cached_tokens(self, request: GenerateRequest, worker_ids: list[str]) -> dict[str, int]:
        """Placement's view of the KV index, in tokens."""
        block_size = self.config.block_size
        known = [*request.prompt_token_ids, *request.output_token_ids]
        blocks = self.control_plane.overlap(known, block_size, worker_ids)
        return {wid: n * block_size for wid, n in blocks.items()}

    # ---- introspection ------------------------------------------------------------------

    def health(self) -> dict:
        return {"workers": self.membership.health(), "in_flight": len(self.requests),
                "control_plane": {**self.control_plane.stats(),
                                  "workers_heard": sorted(self.control_plane.workers())}}

    def worker_metrics(self) -> list[dict]:
        """One entry per worker, then one for the router itself (worker_id 'router': its
        control plane's KV events applied, health and Redis round trips)."""
        workers = [
            {"worker_id": wid, "role": w.role, "ready": w.ready, "incarnation": w.incarnation,
             **self.placement.load(wid).__dict__, **self._prefix_metrics(wid),
             "kv_events_applied": self.membership.kv_events_applied[wid],
             "ranks": self.membership.ranks.get(wid, [])}
            for wid, w in self.workers.items()
        ]
        plane = self.control_plane.stats()
        router = {key: value for key, value in plane.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return [*workers, {"worker_id": "router", "role": "router",
                           "control_plane_healthy": int(plane["healthy"]), **router}]

    def _prefix_metrics(self, worker_id: str) -> dict[str, float]:
        """vLLM's names: prefix_cache_queries / prefix_cache_hits (tokens) and the rate."""
        stats = self.membership.prefix_stats.get(worker_id)
        if stats is None:
            return {}
        return {"prefix_cache_queries": stats["queries"], "prefix_cache_hits": stats["hits"],
                "prefix_cache_hit_rate": stats["hits"] / max(1, stats["queries"])}
