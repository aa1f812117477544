"""The classic (baseline) worker: prefill and decode of a request on one engine."""

from __future__ import annotations

from workers.actors.worker_base import EngineWorker
from workers.protocol import GenerateRequest


class ColocatedWorker(EngineWorker):
    """Runs whole requests; the router's only worker kind in `--colocated K` mode."""

    role = "colocated"

    def submit(self, request: GenerateRequest) -> None:
        """Queues `request`; its tokens stream to `request.output_address`."""
        self.loop.call_soon(lambda: self.add_to_engine(request))
