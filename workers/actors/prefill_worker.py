"""Prefill worker: computes a prompt's KV and first token, ships the KV to a decode worker.

Flow per request (docs/contracts.md): the router has reserved blocks on a decode worker and
calls `prefill(request, dest)`. The transfer is opened before the prefill runs: a streaming
transport (torch: NCCL/gloo) moves each layer's blocks into `dest`'s reserved blocks while the
prefill computes the later layers. The engine (role 'prefill') finishes the request after its
first token with finish_reason 'prefill_done' and holds its blocks. This worker streams token 1
to the gateway, finishes the transfer (token 1 and the phase timings ride in its last
message), and releases the blocks once the transfer is terminal and no send touches them.
Pairs with decode workers are set up when the router introduces them (`connect`).
"""

from __future__ import annotations

import time

from workers.actors.kv_endpoint import make_sender
from workers.actors.worker_base import EngineWorker, WorkerSpec
from workers.errors import TransferFailed, UnknownRequest
from workers.kv_transfer.base import TransferState
from workers.protocol import GenerateRequest, Reservation, WorkerEvent


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.dests: dict[str, Reservation] = {}
        self.kv = make_sender(
            self.engine, spec.kv_transport, spec.host, f"{spec.worker_id}-{self.incarnation}",
            on_done=lambda rid, extra: self.loop.call_soon(lambda: self._shipped(rid)),
            on_failed=lambda rid, state, why: self.loop.call_soon(lambda: self._not_shipped(
                rid, state, why)),
            max_pairs=spec.kv_max_pairs, on_loop=self.loop.on_loop,
        )
        hook = self.kv.stream_hook()
        if hook is not None:
            self.engine.attach_kv_stream(hook)

    def connect(self, kv_addresses: list[str]) -> None:
        """Sets up KV pairs with these decode workers now (they started or joined), so no
        request waits for a handshake or a communicator."""
        for address in kv_addresses:
            self.kv.connect(address)

    def prefill(self, request: GenerateRequest, dest: Reservation) -> None:
        """Queues the prefill of `request`; `dest` is the decode worker's `reserve` answer."""

        def admit() -> None:
            rid = request.attempt_id
            if rid in self.let_go:
                return  # aborted before it came: add_to_engine would refuse it
            self.dests[rid] = dest
            skip = self._skipped_blocks(rid)
            if self.engine.kv_stream is None:  # sent whole: only the blocks after `skip`
                self.kv.open(rid, dest.kv_address, dest.block_ids[skip:],
                             request.num_known_tokens - skip * self._block_size)
            else:  # streamed: spans index the whole table and start after `skip`
                self.kv.open(rid, dest.kv_address, dest.block_ids, request.num_known_tokens)
            if not self.add_to_engine(request):
                self.dests.pop(rid, None)
                self.kv.abort(rid)
                self.kv.forget(rid)
            else:
                self.engine.skip_remote_prefix(rid, skip * self._block_size)

        self.loop.call_soon(admit)

    def on_output(self, output) -> None:
        rid = output.request_id
        if output.finish_reason != "prefill_done":
            # Ended at token 1 (stop, length, error): the stream ends here; the router frees
            # the decode worker's reservation when it sees this request finished.
            self.dests.pop(rid, None)
            self.kv.abort(rid)
            self.kv.forget(rid)
            self.stream(output)
            return
        self.stream(output, finished=False)
        live = self.live[rid]
        now = time.time()
        timings = self.final_timings(live, now)
        timings.pop("decode")
        extra = {
            "first_token_id": output.new_token_ids[-1],
            "num_cached_tokens": output.num_cached_tokens,
            "timings": timings | {"prefill_done_at": now},
        }
        skip = self._skipped_blocks(rid)
        self.kv.finish(rid, self.engine.held_block_ids(rid)[skip:], extra=extra,
                       num_tokens=live.request.num_known_tokens - skip * self._block_size)
        self.note(live.request, WorkerEvent.SENDING)

    @property
    def _block_size(self) -> int:
        return self.engine.pool.block_size

    def _skipped_blocks(self, rid: str) -> int:
        """Leading blocks of the request the decode worker already holds (its prefix cache):
        they are not sent."""
        dest = self.dests.get(rid)
        return dest.num_cached_tokens // self._block_size if dest else 0

    def _shipped(self, rid: str) -> None:
        self._release(rid)
        self.dests.pop(rid, None)
        if rid in self.live:
            self.end(rid, WorkerEvent.SHIPPED)

    def _not_shipped(self, rid: str, state: TransferState, reason: str) -> None:
        self._release(rid)
        self.dests.pop(rid, None)
        if state is TransferState.FAILED and rid in self.live:
            self.finish_with_error(rid, TransferFailed(rid, reason))

    def _release(self, rid: str) -> None:
        """Frees the request's blocks once no posted send reads them any more."""

        def release_now() -> None:
            try:
                self.engine.release(rid)
            except UnknownRequest:
                pass  # already freed

        self.kv.when_quiet(rid, lambda: self.loop.on_loop(release_now))

    def abort_transfers(self, request_id: str) -> None:
        self.kv.abort(request_id)
        self.kv.forget(request_id)
        self.dests.pop(request_id, None)

    def _abort_now(self, request_id: str) -> None:
        # The engine stops the request at once but holds its blocks until no send reads them.
        self.abort_transfers(request_id)
        self.engine.abort(request_id, hold_blocks=True)
        self.live.pop(request_id, None)
        self._release(request_id)

    def transfer_paths(self) -> dict[str, dict]:
        """Per decode address: the path (nccl, gloo, zmq) and the probe's GB/s."""
        return self.loop.call(lambda: {
            dest: {"path": self.kv.path(dest), "gbps": self.kv.bandwidth(dest)}
            for dest in self.kv.pairs()
        })

    def shutdown(self) -> None:
        self.kv.close()
        super().shutdown()
