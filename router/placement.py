"""Where a request runs: the placement half of RouterCore (router/router_core.py).

Disaggregated: a decode worker reserves blocks first (policy order, waiting a while if all
are full), then a prefill worker computes and ships the KV into that reservation; if no
prefill worker takes it, the reservation is given back. Colocated, or a prompt short enough
for conditional disaggregation: one worker runs it whole. An abort that lands while
placement awaits a worker is honoured afterwards (`_undo_if_aborted`).

`Placement` is a mixin: it reads RouterCore's `config`, `workers`, `requests` and
`_policies`, and calls its `_call`, `_call_quietly` and `_release_everywhere`.
"""

from __future__ import annotations

import asyncio
import time

from router.policies import RoutingPolicy, WorkerLoad
from router.router_state import InFlight, RouterConfig, WorkerState
from router.worker_handle import WorkerGone
from workers.errors import NoCapacity, NoReadyWorker


class Placement:
    """Picks and takes workers for one request; mixed into RouterCore."""

    config: RouterConfig
    workers: dict[str, WorkerState]
    requests: dict[str, InFlight]
    _policies: dict[str, RoutingPolicy]

    async def _place(self, entry: InFlight) -> None:
        if self._count("colocated"):
            await self._place_whole(entry, "colocated")
            return
        if len(entry.request.prompt_token_ids) <= self.config.local_prefill_max_tokens:
            await self._place_whole(entry, "decode")
            return
        if not self._ready("prefill"):  # before a decode worker reserves anything
            raise NoReadyWorker("prefill", self._count("prefill"))
        entry.decode = await self._reserve_decode(entry)
        if entry.decode is None or await self._undo_if_aborted(entry):
            return
        entry.phase = "prefilling"
        try:
            entry.prefill = await self._first_that_takes("prefill", entry, "prefill", entry.dest)
        except BaseException:
            await self._call_quietly(entry.decode, "abort", entry.request.request_id)
            raise
        await self._undo_if_aborted(entry)

    async def _place_whole(self, entry: InFlight, role: str) -> None:
        """One worker runs the whole request: colocated, or a decode worker prefilling a
        short prompt itself (conditional disaggregation)."""
        setattr(entry, role, await self._first_that_takes(role, entry, "submit"))
        entry.phase = "running"
        await self._undo_if_aborted(entry)

    async def _undo_if_aborted(self, entry: InFlight) -> bool:
        """An abort that arrived while placement awaited a worker found nothing to free
        there yet: free what placement has taken since."""
        if self.requests.get(entry.request.request_id) is entry:
            return False
        await self._release_everywhere(entry, keep=None)
        return True

    async def _reserve_decode(self, entry: InFlight) -> str | None:
        """Asks decode workers (policy order) to reserve blocks, waiting a while if all are
        full; records the destination the prefill worker writes to. None: aborted while
        waiting."""
        deadline = time.monotonic() + self.config.capacity_wait_s
        while self.requests.get(entry.request.request_id) is entry:
            refusal: NoCapacity | None = None
            for worker_id in self._order("decode", entry):
                try:
                    dest = await self._call(worker_id, "reserve", entry.request)
                except NoCapacity as exc:
                    refusal = exc
                    continue
                except WorkerGone:
                    continue
                entry.dest = dest
                self._attach(worker_id, entry)
                return worker_id
            if refusal is None:
                raise NoReadyWorker("decode", self._count("decode"))
            if time.monotonic() > deadline:
                raise refusal
            await asyncio.sleep(self.config.poll_interval_s / 4)
        return None

    async def _first_that_takes(self, role: str, entry: InFlight, method: str, *args) -> str:
        for worker_id in self._order(role, entry):
            try:
                await self._call(worker_id, method, entry.request, *args)
            except WorkerGone:
                continue
            self._attach(worker_id, entry)
            return worker_id
        raise NoReadyWorker(role, self._count(role))

    def _order(self, role: str, entry: InFlight) -> list[str]:
        loads = [self._load(wid, w) for wid, w in self.workers.items()
                 if w.role == role and w.ready]
        return self._policies[role].order(loads, entry.blocks)

    def _load(self, worker_id: str, worker: WorkerState) -> WorkerLoad:
        entries = [self.requests[r] for r in worker.requests if r in self.requests]
        return WorkerLoad(
            worker_id,
            outstanding_tokens=sum(e.tokens for e in entries),
            num_requests=len(entries),
            free_blocks=worker.free_blocks,
            total_blocks=worker.total_blocks,
        )

    def _attach(self, worker_id: str, entry: InFlight) -> None:
        worker = self.workers[worker_id]
        worker.requests.add(entry.request.request_id)
        if worker.role == "decode":
            # Until the next poll, count the reservation so the next pick sees it.
            worker.free_blocks -= entry.blocks

    def _ready(self, role: str) -> bool:
        return any(w.ready for w in self.workers.values() if w.role == role)

    def _count(self, role: str) -> int:
        return sum(1 for w in self.workers.values() if w.role == role)
