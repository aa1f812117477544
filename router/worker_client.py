"""The router's typed calls to one worker: each hop is a method of `WorkerApi`
(workers/actors/worker_api.py) that a reader (or a tool) follows from `worker.reserve(request)`
here to `DecodeWorker.reserve` (workers/actors/), with typed messages both ways
(workers/protocol.py), never a method name in a string.

`call(method, *args)` is RouterCore's (router/router_core.py): it reaches the worker through
its WorkerHandle (a Ray actor or an in-process object) and, when the worker does not answer,
drops it (its requests migrate or end) and raises WorkerGone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from router.worker_handle import WorkerGone
from workers.actors.worker_api import WorkerApi
from workers.protocol import GenerateRequest, LetGo, OutputChunk, Reservation, WorkerReport

Call = Callable[..., Awaitable[Any]]


class WorkerClient:
    def __init__(self, worker_id: str, call: Call):
        self.worker_id = worker_id
        self._call = call

    async def report(self, news_address: str) -> WorkerReport:
        """The health check: identity, liveness and load; news goes to `news_address`."""
        return await self._call(WorkerApi.report, news_address)

    async def ready(self) -> dict[str, Any]:
        """Identity, model and shape facts (its `ranks`, for the per-rank /metrics)."""
        return await self._call(WorkerApi.ready)

    async def republish_kv(self) -> None:
        """Asks for every cached block name in the next report (the index was lost)."""
        await self._call(WorkerApi.republish_kv)

    async def reserve(self, request: GenerateRequest) -> Reservation:
        """Decode worker: reserves blocks for the request's KV; returns where the prefill
        worker writes. Raises NoCapacity (or another typed refusal)."""
        return await self._call(WorkerApi.reserve, request)

    async def prefill(self, request: GenerateRequest, dest: Reservation) -> None:
        """Prefill worker: computes the prompt's KV into the reservation `dest`, streaming it
        there, and token 1 to the gateway."""
        await self._call(WorkerApi.prefill, request, dest)

    async def submit(self, request: GenerateRequest) -> None:
        """A colocated worker, or a decode worker prefilling a short prompt itself: runs the
        request whole."""
        await self._call(WorkerApi.submit, request)

    async def abort(self, attempt_id: str) -> LetGo:
        """Ends the attempt here silently (its blocks free). Returns once no chunk of it will
        leave this worker again, with how far this worker streamed it; a placement of it
        that reaches the worker later is refused."""
        return await self._call(WorkerApi.abort, attempt_id)

    async def abort_quietly(self, attempt_id: str) -> LetGo | None:
        """`abort`, where a worker that is gone has nothing left to free (None)."""
        try:
            return await self.abort(attempt_id)
        except WorkerGone:
            return None

    async def send_final(self, address: str, chunk: OutputChunk) -> None:
        """Sends the request's final chunk behind every chunk this worker sent
        (router/final_chunk.py)."""
        await self._call(WorkerApi.send_final, address, chunk)

    async def connect(self, kv_addresses: list[str]) -> None:
        """Prefill worker: sets up KV pairs with these decode workers' receivers now."""
        await self._call(WorkerApi.connect, kv_addresses)

    async def landed(self, attempt_ids: list[str]) -> list[str]:
        """Decode worker: which of these attempts' KV has landed here."""
        return await self._call(WorkerApi.landed, attempt_ids)
