"""The calls a worker answers, as one typed interface: what the router's typed client
(router/worker_client.py) calls and the worker classes (worker_base.py, prefill_worker.py,
decode_worker.py) implement. A call names its method here (`WorkerApi.reserve`), never as a
string, so a reader or a tool follows each hop from the router to the worker; the handles
(router/worker_handle.py) and the Ray actor's `execute` carry it to the worker object.
"""

from __future__ import annotations

from typing import Protocol

from workers.protocol import GenerateRequest, LetGo, OutputChunk, Reservation, WorkerReport


class WorkerApi(Protocol):
    def ready(self) -> dict:
        """Identity, model and shape facts once the engine is loaded (its ranks' KV caches
        among them: the gateway's per-rank /metrics)."""
        ...

    def report(self, news_address: str) -> WorkerReport:
        """Health check and load (every poll interval); the worker pushes its `WorkerNews`
        to `news_address` while this router keeps checking it."""
        ...

    def republish_kv(self) -> None:
        """The router lost its index of this worker's cached KV blocks: the next report
        carries all of them (reset + stored)."""
        ...

    def reserve(self, request: GenerateRequest) -> Reservation:
        """Decode worker: reserves blocks for the request's KV; raises NoCapacity (or another
        typed refusal)."""
        ...

    def prefill(self, request: GenerateRequest, dest: Reservation) -> None:
        """Prefill worker: computes the prompt's KV into `dest`, streaming it there, and token
        1 to the gateway."""
        ...

    def submit(self, request: GenerateRequest) -> None:
        """A colocated worker, or a decode worker prefilling a short prompt itself: runs the
        request whole."""
        ...

    def abort(self, attempt_id: str) -> LetGo:
        """Ends the attempt here silently; returns once no chunk of it will leave this worker
        again, with how far this worker streamed it."""
        ...

    def send_final(self, address: str, chunk: OutputChunk) -> None:
        """Sends the request's final chunk behind every chunk this worker sent."""
        ...

    def connect(self, kv_addresses: list[str]) -> None:
        """Prefill worker: sets up KV pairs with these decode workers' receivers now."""
        ...

    def landed(self, attempt_ids: list[str]) -> list[str]:
        """Decode worker: which of these attempts' KV has landed here."""
        ...
