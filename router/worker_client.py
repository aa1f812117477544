"""The router's typed calls to one worker: each hop is a method a reader (or a tool) can
follow from `worker.reserve(request)` here to `DecodeWorker.reserve` (workers/), instead of a
method name in a string.

`call(method, *args)` is RouterCore's (router/router_core.py): it reaches the worker through
its WorkerHandle (a Ray actor or an in-process object) and, when the worker does not answer,
drops it (its requests migrate or end) and raises WorkerGone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from router.worker_handle import WorkerGone
from workers.protocol import GenerateRequest

Call = Callable[..., Awaitable[Any]]


class WorkerClient:
    def __init__(self, worker_id: str, call: Call):
        self.worker_id = worker_id
        self._call = call

    async def reserve(self, request: GenerateRequest) -> dict[str, Any]:
        """Decode worker (workers/actors/decode_worker.py): reserves blocks for the request's KV;
        returns the reservation (block ids, KV receiver address) the prefill worker writes
        to. Raises NoCapacity (or another typed refusal)."""
        return await self._call("reserve", request)

    async def prefill(self, request: GenerateRequest, dest: dict[str, Any]) -> None:
        """Prefill worker (workers/actors/prefill_worker.py): computes the prompt's KV into the
        reservation `dest`, streaming it there, and token 1 to the gateway."""
        await self._call("prefill", request, dest)

    async def submit(self, request: GenerateRequest) -> None:
        """A colocated worker, or a decode worker prefilling a short prompt itself: runs the
        request whole."""
        await self._call("submit", request)

    async def abort(self, attempt_id: str) -> None:
        """Ends the attempt here silently (its blocks free); the router sends the final
        chunk. Returns once no chunk of it will leave this worker again."""
        await self._call("abort", attempt_id)

    async def abort_quietly(self, attempt_id: str) -> None:
        """`abort`, where a worker that is gone has nothing left to free."""
        try:
            await self.abort(attempt_id)
        except WorkerGone:
            pass

    async def connect(self, kv_addresses: list[str]) -> None:
        """Prefill worker: sets up KV pairs with these decode workers' receivers now."""
        await self._call("connect", kv_addresses)

    async def landed(self, attempt_ids: list[str]) -> list[str]:
        """Decode worker: which of these attempts' KV has landed here."""
        return await self._call("landed", attempt_ids)
