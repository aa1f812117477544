"""The final chunk of a request the router ends (abort, deadline, a loss it cannot survive):
exactly one, and nothing of the request after it on the wire.

Up to two workers stream one request (the prefill worker token 1, the decode worker the
rest), each on its own ZMQ connection to the gateway; one connection keeps order, two do not
(a PULL socket takes turns between its connections). So the final chunk goes out only after
every holder let go (the lifecycle's `Abort`s, each answered once no chunk of the attempt will
leave that worker again, with how far it streamed: `LetGo`), and from the worker that streamed
last, on the connection its tokens took, so none of them can overtake it. When no holder
streamed anything the router writes it; when a worker had already ended the stream itself
(its own final chunk is out), nobody writes another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from router.lifecycle import SendFinal
from router.router_state import InFlight
from router.worker_client import WorkerClient
from router.worker_handle import WorkerGone
from workers.actors.output_sender import OutputSender
from workers.protocol import LetGo, OutputChunk


class FinalChunks:
    """RouterCore's writer of `SendFinal`; see the module docstring."""

    def __init__(self, sender: OutputSender, worker: Callable[[str], WorkerClient]):
        self._sender = sender
        self._worker = worker

    async def send(self, entry: InFlight, final: SendFinal, let_go: dict[str, LetGo]) -> None:
        """Writes `final` for `entry`, whose holders answered `let_go` (by worker id)."""
        if any(answer.ended for answer in let_go.values()):
            return
        request = entry.request
        error = final.error
        chunk = OutputChunk(
            request_id=request.request_id,
            finished=True,
            finish_reason=final.reason,
            error=str(error) if error else None,
            error_type=type(error).__name__ if error else None,
            num_prompt_tokens=len(request.prompt_token_ids),
            worker_id="router",
            attempt=entry.life.migrations,
        )
        streamed = {wid: answer.last_index for wid, answer in let_go.items()
                    if answer.last_index >= 0}
        if streamed:
            writer = max(streamed, key=streamed.__getitem__)
            try:
                await self._worker(writer).send_final(
                    request.output_address, dataclasses.replace(chunk, worker_id=writer))
                return
            except WorkerGone:
                pass  # what it sent before dying may still be on its way; nothing to wait on
        self._sender.send(request.output_address, chunk)
