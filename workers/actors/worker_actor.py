"""The Ray actor body of every worker: builds one plain worker and forwards calls to it.

As vLLM's Ray executor: the actor is thin, `execute(method, *args)` calls the plain object's
method (the same object tests run in-process), and typed errors travel as `RemoteError`
(workers/actors/remote_errors.py) so the router gets them back with their numbers. Any other
exception is logged here and travels as `InternalError`: its text (paths, addresses) stays
in this worker's log.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ray

from workers.actors.colocated_worker import ColocatedWorker
from workers.actors.decode_worker import DecodeWorker
from workers.actors.prefill_worker import PrefillWorker
from workers.actors.remote_errors import RemoteError, to_wire
from workers.actors.worker_base import EngineWorker, WorkerSpec
from workers.errors import InternalError, KvrelayError

WORKER_CLASSES: dict[str, type[EngineWorker]] = {
    "colocated": ColocatedWorker, "prefill": PrefillWorker, "decode": DecodeWorker,
}


WILDCARD_HOSTS = ("0.0.0.0", "::", "")

log = logging.getLogger(__name__)


class WorkerActor:
    """`ray.remote(WorkerActor).options(...).remote(role, spec)`; see the module docstring."""

    def __init__(self, role: str, spec: WorkerSpec):
        # INFO so each KV pair's path and bandwidth reach the driver's log.
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        if spec.host in WILDCARD_HOSTS:
            # Peers on other nodes connect to the address this worker advertises, so bind
            # its KV receiver on this node's own IP rather than a wildcard.
            spec = dataclasses.replace(spec, host=ray.util.get_node_ip_address())
        self.worker = WORKER_CLASSES[role](spec)

    def execute(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.worker, method)(*args)
        except KvrelayError as exc:
            raise RemoteError(to_wire(exc)) from None
        except Exception:
            log.exception("%s(...) failed on %s", method, self.worker.worker_id)
            raise RemoteError(to_wire(InternalError(self.worker.worker_id))) from None
