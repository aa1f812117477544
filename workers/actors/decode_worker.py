"""Decode worker: reserves blocks for a request, receives its prompt's KV, decodes the rest.

Flow per request (docs/contracts.md): the router calls `reserve(request)` before any prefill
starts (NoCapacity: the router tries another decode worker); the answer tells the prefill
worker where to write. When the KV has landed, the receiver's callback commits the sequence to
the running batch with the first token (already streamed by the prefill worker); tokens 2..
stream from here. Abort at any phase frees the reservation or the running sequence.
"""

from __future__ import annotations

import logging
import time

from workers.actors.kv_endpoint import make_receiver
from workers.actors.live_request import LiveRequest
from workers.actors.worker_base import EngineWorker, WorkerSpec
from workers.errors import UnknownRequest
from workers.kv_transfer.base import TransferState
from workers.protocol import GenerateRequest, Reservation

log = logging.getLogger(__name__)


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.kv = make_receiver(
            self.engine, spec.kv_transport, spec.host,
            on_done=lambda rid, extra: self.loop.call_soon(lambda: self._landed(rid, extra)),
            on_failed=lambda rid, state, why: self.loop.call_soon(lambda: self._not_landed(
                rid, state, why)),
            on_loop=self.loop.on_loop,
        )

    def reserve(self, request: GenerateRequest) -> Reservation:
        """Reserves blocks for the prompt (a continuation: and its known output) plus the
        next token; raises NoCapacity (or the engine's typed refusal). Returns where the
        prefill worker writes: block ids and address, and `num_cached_tokens`, the leading
        tokens whose KV is cached here (their blocks are not written). An attempt aborted
        before it came raises UnknownRequest."""

        def reserve_now() -> Reservation:
            key = request.attempt_id
            if key in self.let_go:
                raise UnknownRequest(key)
            block_ids = self.engine.reserve_remote(
                key, request.prompt_token_ids, request.sampling, request.priority,
                request.output_token_ids, request.sent_text_len,
            )
            self.live[key] = LiveRequest(request)
            # Leading blocks already cached here are shared, not received.
            cached = self.engine.reserved_cached_tokens(key)
            self.kv.expect(key, block_ids[cached // self.engine.pool.block_size:])
            return Reservation(self.worker_id, list(block_ids), self.kv.address, cached)

        return self.loop.call(reserve_now)

    def submit(self, request: GenerateRequest) -> None:
        """Conditional disaggregation: runs a short request whole here (prefill included)."""
        self.loop.call_soon(lambda: self.add_to_engine(request))

    def landed(self, attempt_ids: list[str]) -> list[str]:
        """Those of `attempt_ids` whose KV has fully arrived here (they need no prefill
        worker any more), for the router when a prefill worker dies."""
        # Finished ones count too: their final chunk is out (or on its way) from here.
        return self.loop.call(lambda: [rid for rid in attempt_ids
                                  if self.kv.state(rid) is TransferState.DONE])

    def _landed(self, rid: str, extra: dict) -> None:
        live = self.live.get(rid)
        if live is None:
            return  # aborted while the data was in flight
        now = time.time()
        live.timings.update(extra.get("timings", {}))
        # KV ready delay: from the end of prefill (token 1 sampled on the prefill worker) to
        # the KV having landed here, what a user waits beyond prefill (wall clocks of one host,
        # or NTP-synced hosts); beside it the bytes and the wire time of the data itself.
        sent_at = live.timings.pop("prefill_done_at", now)
        live.timings["kv_ready_delay"] = max(0.0, now - sent_at)
        record = self.kv.table.get(rid)
        if record is not None:
            live.timings["transfer_wire"] = record.seconds
            live.timings["transfer_bytes"] = float(record.num_bytes)
        # Token 1 (of this placement) was streamed by the prefill worker; decode timing
        # starts from it.
        live.first_token_at = now
        live.num_output_tokens = live.request.resume_index + 1
        self.engine.commit_remote(rid, extra["first_token_id"],
                                  extra.get("num_cached_tokens", 0))

    def _not_landed(self, rid: str, state: TransferState, reason: str) -> None:
        # Frees the reservation but stays silent: the prefill worker's end of the same transfer
        # fails too and tells the client, or the router does if that worker died. One of them,
        # never both, so the client gets exactly one final chunk.
        if rid in self.live:
            log.info("kv transfer of %s did not land (%s): %s", rid, state.value, reason)
            self.live.pop(rid, None)
            self._free_when_quiet(rid)

    def _free_when_quiet(self, rid: str) -> None:
        """Frees a reservation once no posted receive can write into its blocks."""
        self.kv.when_quiet(rid, lambda: self.loop.on_loop(lambda: self.engine.abort(rid)))

    def _abort_now(self, request_id: str) -> None:
        self.kv.abort(request_id)
        self.live.pop(request_id, None)
        if self.kv.state(request_id) is TransferState.DONE or self.kv.state(request_id) is None:
            self.engine.abort(request_id)  # decoding (or never reserved): nothing in flight
        else:
            self._free_when_quiet(request_id)

    def final_timings(self, live: LiveRequest, now: float) -> dict[str, float]:
        if "kv_ready_delay" not in live.timings:  # prefilled here (conditional disaggregation)
            return super().final_timings(live, now)
        timings = dict(live.timings)
        timings["decode"] = now - (live.first_token_at or now)
        return timings

    def kv_address(self) -> str | None:
        kv = getattr(self, "kv", None)  # polled before construction has finished
        return kv.address if kv is not None else None

    def abort_transfers(self, request_id: str) -> None:
        self.kv.abort(request_id)

    def shutdown(self) -> None:
        self.kv.close()
        super().shutdown()
