"""The Ray actor body of every worker: builds one plain worker and forwards calls to it.

As vLLM's Ray executor: the actor is thin, `execute(method, *args)` calls the plain object's
method (the same object tests run in-process), and typed errors travel as `RemoteError`
(workers/remote_errors.py) so the router gets them back with their numbers.
"""

from __future__ import annotations

from typing import Any

from workers.colocated_worker import ColocatedWorker
from workers.decode_worker import DecodeWorker
from workers.errors import KvrelayError
from workers.prefill_worker import PrefillWorker
from workers.remote_errors import RemoteError, to_wire
from workers.worker_base import EngineWorker, WorkerSpec

WORKER_CLASSES: dict[str, type[EngineWorker]] = {
    "colocated": ColocatedWorker, "prefill": PrefillWorker, "decode": DecodeWorker,
}


class WorkerActor:
    """`ray.remote(WorkerActor).options(...).remote(role, spec)`; see the module docstring."""

    def __init__(self, role: str, spec: WorkerSpec):
        self.worker = WORKER_CLASSES[role](spec)

    def execute(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.worker, method)(*args)
        except KvrelayError as exc:
            raise RemoteError(to_wire(exc)) from None
