"""Prefill worker: computes a prompt's KV and first token, ships the KV to a decode worker.

Flow per request (docs/contracts.md): the router has reserved blocks on a decode worker and
calls `prefill(request, dest)`. The engine (role 'prefill') finishes the request after its first
token with finish_reason 'prefill_done' and holds its blocks. This worker streams token 1 to
the gateway, sends the prompt's blocks into `dest`'s reserved blocks (token 1 and the phase
timings ride in the transfer header), and releases the blocks once the transfer is terminal.
"""

from __future__ import annotations

import time

from workers.errors import TransferFailed, UnknownRequest
from workers.kv_endpoint import make_sender
from workers.kv_transfer.base import TransferState
from workers.protocol import GenerateRequest
from workers.worker_base import EngineWorker, WorkerSpec


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.dests: dict[str, dict] = {}
        self.kv = make_sender(
            self.engine, spec.kv_transport, spec.host, f"{spec.worker_id}-{self.incarnation}",
            on_done=lambda rid, extra: self.call_soon(lambda: self._shipped(rid)),
            on_failed=lambda rid, state, why: self.call_soon(lambda: self._not_shipped(
                rid, state, why)),
        )

    def prefill(self, request: GenerateRequest, dest: dict) -> None:
        """Queues the prefill of `request`; `dest` is the decode worker's `reserve` answer."""

        def admit() -> None:
            self.dests[request.request_id] = dest
            if not self.add_to_engine(request):
                self.dests.pop(request.request_id, None)

        self.call_soon(admit)

    def on_output(self, output) -> None:
        rid = output.request_id
        if output.finish_reason != "prefill_done":
            # Ended at token 1 (stop, length, error): the stream ends here; the router frees
            # the decode worker's reservation when it sees this request finished.
            self.dests.pop(rid, None)
            self.stream(output)
            return
        self.stream(output, finished=False)
        live, dest = self.live[rid], self.dests[rid]
        now = time.time()
        timings = self.final_timings(live, now)
        timings.pop("decode")
        extra = {
            "first_token_id": output.new_token_ids[-1],
            "timings": timings | {"prefill_done_at": now},
        }
        self.kv.send(rid, dest["kv_address"], self.engine.held_block_ids(rid),
                     dest["block_ids"], extra=extra, num_tokens=output.num_prompt_tokens)
        self.note(rid, "sending")

    def _shipped(self, rid: str) -> None:
        self._release(rid)
        self.dests.pop(rid, None)
        if rid in self.live:
            self.end(rid, "shipped")

    def _not_shipped(self, rid: str, state: TransferState, reason: str) -> None:
        self._release(rid)
        self.dests.pop(rid, None)
        if state is TransferState.FAILED and rid in self.live:
            self.finish_with_error(rid, TransferFailed(rid, reason))

    def _release(self, rid: str) -> None:
        try:
            self.engine.release(rid)
        except UnknownRequest:
            pass  # already freed by an abort, which ended the transfer too

    def abort_transfers(self, request_id: str) -> None:
        # Once abort returns no copy reads the blocks, so the engine may free them.
        self.kv.abort(request_id)
        self.dests.pop(request_id, None)

    def transfer_paths(self) -> dict[str, dict]:
        """Per decode address: the path (nccl, gloo, zmq) and the probe's GB/s."""
        return self.call(lambda: {
            dest: {"path": self.kv.path(dest), "gbps": self.kv.bandwidth(dest)}
            for dest in self.kv.pairs()
        })

    def shutdown(self) -> None:
        self.kv.close()
        super().shutdown()
