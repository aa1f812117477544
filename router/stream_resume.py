"""The gateway's side of one request's migrations (docs/contracts.md "Migration").

The router asks for a continuation with a `Resume` on the request's output channel; the
receiver (router/output_receiver.py) knows what the client got and calls `resume` with it.
`StreamResume` submits the continuation (`GenerateRequest.continued`) to the backend, which
places it like a new request; once tokens flow again the receiver calls `resumed` with how
long the client's stream stalled, which the metrics record as the migration's added latency.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from workers.protocol import GenerateRequest, Resume

if TYPE_CHECKING:
    from router.gateway import Backend, MetricsSink

log = logging.getLogger(__name__)


class StreamResume:
    """Continues `request` (as submitted) through `backend` when the router asks."""

    def __init__(self, backend: Backend, request: GenerateRequest,
                 metrics: MetricsSink | None = None):
        self.backend = backend
        self.request = request
        self.metrics = metrics
        self._task: asyncio.Task | None = None
        """The submission under way (held, so it is not collected mid-flight)."""

    def resume(self, resume: Resume, output_token_ids: list[int], sent_text_len: int) -> None:
        continuation = self.request.continued(resume, output_token_ids, sent_text_len)
        self._task = asyncio.get_running_loop().create_task(self._submit(continuation))

    def resumed(self, stall_s: float) -> None:
        if self.metrics is not None:
            self.metrics.migrated(stall_s)

    async def _submit(self, continuation: GenerateRequest) -> None:
        try:
            await self.backend.resume(continuation)
        except Exception:  # the router unreachable: the request ends at its deadline
            log.exception("continuation of %s (attempt %d) failed", continuation.request_id,
                          continuation.attempt)
