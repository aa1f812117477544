"""Where a request runs: RouterCore's placement collaborator (router/router_core.py).

Disaggregated: a decode worker reserves blocks first (policy order, waiting a while if all
are full), then a prefill worker computes and ships the KV into that reservation; if no
prefill worker takes it, the reservation is given back. Colocated, or a prompt short enough
for conditional disaggregation: one worker runs it whole. Each worker that takes the request
is recorded in its RequestLife (Reserved, Placed, of the placed request's attempt) through
`took`, which tells the worker to let go instead if the life refuses (the request ended, or
migrated to a newer attempt, while placement awaited the worker). While a worker is asked it
already counts as a holder (Asking, then Declined if it does not take it), so an end that
comes meanwhile tells it to let go as well. A continuation (after a migration,
router/migration.py) is placed the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

from router.control_plane import ControlPlane, Load
from router.lifecycle import Asking, Declined, Event, Placed, Reserved
from router.policies import RoutingPolicy, WorkerLoad
from router.router_state import InFlight, RouterConfig, WorkerState
from router.worker_client import WorkerClient
from router.worker_handle import WorkerGone
from workers.errors import KvrelayError, NoCapacity, NoReadyWorker
from workers.protocol import GenerateRequest, Reservation

Workers = Callable[[str], WorkerClient]
Took = Callable[[InFlight, GenerateRequest, str, Event], Awaitable[bool]]
Apply = Callable[[InFlight, Event], Awaitable[bool]]
CachedTokens = Callable[[GenerateRequest, list[str]], dict[str, int]]
"""Per worker id, the leading tokens of the request whose KV it holds (the KV index)."""


class Placement:
    """Picks and takes workers for one request at a time (`place`), and reports loads."""

    def __init__(self, config: RouterConfig, workers: dict[str, WorkerState],
                 requests: dict[str, InFlight], policies: dict[str, RoutingPolicy],
                 worker: Workers, took: Took, apply: Apply,
                 cached_tokens: CachedTokens | None = None,
                 control_plane: ControlPlane | None = None):
        self.config = config
        self._plane = control_plane
        self._others: dict[str, Load] = {}
        """Per worker, what the other routers placed there (their last shared loads)."""
        self._cached_tokens = cached_tokens
        self.workers = workers
        self.requests = requests
        self._policies = policies
        self._worker = worker
        self._took = took
        self._apply = apply

    async def place(self, entry: InFlight) -> None:
        """Places `entry.request` (this attempt); raises NoReadyWorker, NoCapacity or a
        worker's typed refusal."""
        request = entry.request
        if self._count("colocated"):
            await self._place_whole(entry, request, "colocated")
            return
        if self._prefill_on_decode(request):
            await self._place_whole(entry, request, "decode")
            return
        if not self._ready("prefill"):  # before a decode worker reserves anything
            raise NoReadyWorker("prefill", self._count("prefill"))
        reserved = await self._reserve_decode(entry, request)
        if reserved is None:
            return
        decode, dest = reserved
        if not await self._took(entry, request, decode, Reserved(decode,
                                                                 attempt=request.attempt)):
            return
        try:
            prefill = await self._first_that_takes(
                "prefill", entry, request, lambda worker: worker.prefill(request, dest))
        except BaseException:
            await self._worker(decode).abort_quietly(request.attempt_id)
            raise
        if prefill is not None:
            await self._took(entry, request, prefill, Placed(prefill, attempt=request.attempt))

    async def _place_whole(self, entry: InFlight, request: GenerateRequest, role: str) -> None:
        """One worker runs the whole request: colocated, or a decode worker prefilling a
        short prompt itself (conditional disaggregation)."""
        worker_id = await self._first_that_takes(role, entry, request,
                                                 lambda worker: worker.submit(request))
        if worker_id is not None:
            await self._took(entry, request, worker_id,
                             Placed(worker_id, whole=True, attempt=request.attempt))

    async def _reserve_decode(self, entry: InFlight,
                              request: GenerateRequest) -> tuple[str, Reservation] | None:
        """Asks decode workers (policy order) to reserve blocks, waiting a while if all are
        full. Returns the worker and its reservation (block ids, KV receiver address: where
        the prefill worker writes); None: the request ended or migrated while waiting."""
        deadline = time.monotonic() + self.config.capacity_wait_s
        while not entry.life.phase.terminal and entry.request is request:
            refusal: NoCapacity | None = None
            for worker_id in self._order("decode", entry):
                try:
                    dest = await self._ask(entry, request, worker_id,
                                           lambda worker: worker.reserve(request))
                except _Ended:
                    return None
                except NoCapacity as exc:
                    refusal = exc
                    continue
                except WorkerGone:
                    continue
                self._attach(worker_id, entry)
                return worker_id, dest
            if refusal is None:
                raise NoReadyWorker("decode", self._count("decode"))
            if time.monotonic() > deadline:
                raise refusal
            await asyncio.sleep(self.config.poll_interval_s / 4)
        return None

    async def _first_that_takes(self, role: str, entry: InFlight, request: GenerateRequest,
                                take: Callable[[WorkerClient], Awaitable[None]]) -> str | None:
        """The first worker of `role` (policy order) that `take` places the request on; None:
        the request ended or migrated meanwhile."""
        for worker_id in self._order(role, entry):
            try:
                await self._ask(entry, request, worker_id, take)
            except _Ended:
                return None
            except WorkerGone:
                continue
            self._attach(worker_id, entry)
            return worker_id
        raise NoReadyWorker(role, self._count(role))

    async def _ask(self, entry: InFlight, request: GenerateRequest, worker_id: str,
                   call: Callable[[WorkerClient], Awaitable]):
        """`call` on `worker_id`, which holds the request meanwhile (Asking); a typed refusal
        or a gone worker Declines. Raises _Ended if the life no longer takes workers for
        `request` (it ended or migrated)."""
        if not await self._apply(entry, Asking(worker_id, attempt=request.attempt)):
            raise _Ended()
        try:
            return await call(self._worker(worker_id))
        except (KvrelayError, WorkerGone):
            await self._apply(entry, Declined(worker_id, attempt=request.attempt))
            raise

    def _prefill_on_decode(self, request: GenerateRequest) -> bool:
        """Conditional disaggregation: a decode worker prefills the request itself when what
        it would still compute (the prompt less what it has cached) is short, or when every
        prefill worker's queue is long (a remote prefill would wait more than it saves)."""
        limit = self.config.local_prefill_max_tokens
        if request.num_known_tokens <= limit:
            return True
        if limit > 0 and self._cached_tokens is not None:
            decodes = [wid for wid, w in self.workers.items()
                       if w.role == "decode" and w.ready]
            cached = max(self._cached_tokens(request, decodes).values(), default=0)
            if request.num_known_tokens - cached <= limit:
                return True
        queue_limit = self.config.max_prefill_queue_tokens
        queues = [self.load(wid).outstanding_tokens for wid, w in self.workers.items()
                  if w.role == "prefill" and w.ready]
        return queue_limit > 0 and bool(queues) and min(queues) >= queue_limit

    def _order(self, role: str, entry: InFlight) -> list[str]:
        loads = [self.load(wid) for wid, w in self.workers.items() if w.role == role and w.ready]
        policy = self._policies[role]
        if policy.uses_kv_index and self._cached_tokens is not None:
            cached = self._cached_tokens(entry.request, [w.worker_id for w in loads])
            loads = [dataclasses.replace(w, cached_tokens=cached.get(w.worker_id, 0))
                     for w in loads]
        return policy.order(loads, entry.blocks)

    def load(self, worker_id: str) -> WorkerLoad:
        """This router's requests on the worker plus the other routers' (shared loads)."""
        worker = self.workers[worker_id]
        tokens, requests = self._own_load(worker_id)
        other_tokens, other_requests = self._others.get(worker_id, (0, 0))
        return WorkerLoad(
            worker_id,
            outstanding_tokens=tokens + other_tokens,
            num_requests=requests + other_requests,
            free_blocks=worker.free_blocks,
            total_blocks=worker.total_blocks,
        )

    def _own_load(self, worker_id: str) -> Load:
        entries = [self.requests[r] for r in self.workers[worker_id].requests
                   if r in self.requests]
        return sum(e.tokens for e in entries), len(entries)

    def share_loads(self) -> None:
        """Publishes this router's load per worker and keeps the other routers' (once per
        poll interval, router/membership.py)."""
        if self._plane is not None:
            self._others = self._plane.share_loads(
                {wid: self._own_load(wid) for wid in self.workers})

    def _attach(self, worker_id: str, entry: InFlight) -> None:
        worker = self.workers[worker_id]
        worker.requests.add(entry.request_id)
        if worker.role == "decode":
            # Until the next poll, count the reservation so the next pick sees it.
            worker.free_blocks -= entry.blocks

    def _ready(self, role: str) -> bool:
        return any(w.ready for w in self.workers.values() if w.role == role)

    def _count(self, role: str) -> int:
        return sum(1 for w in self.workers.values() if w.role == role)


class _Ended(Exception):
    """The request ended or migrated while placement was choosing its workers."""
