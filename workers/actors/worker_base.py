"""A worker: one LLMEngine driven by its own loop thread, streaming outputs over ZMQ.

The engine is not thread-safe, so every engine call runs in the loop thread
(workers/actors/engine_loop.py): public methods (called from Ray's actor threads or from a
test) post closures to it with `loop.call` / `loop.call_soon`. Outputs leave as
`OutputChunk`s (workers/actors/live_request.py) PUSHed to the request's gateway address,
never as Ray calls per token. The router checks health and load with `report()` and learns
how each request goes from `WorkerNews` this worker pushes to it as it happens (`note`).

A worker keys each placement by `GenerateRequest.attempt_id` (engine, transfers, `abort`): a
request continued after a migration may come back to a worker still letting go of its
earlier attempt. Its chunks carry the client's request id and the attempt; a continuation
numbers them from `resume_index`. The worker remembers the attempts it let go of (`let_go`,
bounded): `abort` answers how far it streamed one (`LetGo`), and a placement that reaches it
after its abort (Ray does not order calls of a threaded actor) is refused.

Subclasses (`ColocatedWorker`, `PrefillWorker`, `DecodeWorker`) add their role's entry points
and react to outputs in `on_output`. They run in-process without Ray; `ray.remote(cls)` makes
the actor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from workers.actors.engine_loop import EngineLoop
from workers.actors.host_memory import return_large_frees_to_os
from workers.actors.kv_endpoint import kv_layout
from workers.actors.kv_event_buffer import KvEventBuffer
from workers.actors.live_request import LiveRequest, error_chunk
from workers.actors.output_sender import OutputSender
from workers.actors.rank_group import make_engine, shape_facts
from workers.config import EngineConfig
from workers.errors import InternalError, KvrelayError
from workers.protocol import (
    GenerateRequest,
    LetGo,
    OutputChunk,
    WorkerEvent,
    WorkerNews,
    WorkerReport,
)

log = logging.getLogger(__name__)

# A router that has not checked this worker for this long gets no more of its news.
_ROUTER_GONE_S = 10.0
# Attempts let go of that a worker remembers (for `abort`'s answer and late placements).
_LET_GO_KEPT = 4096


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, built once by the launcher (per-role copies via replace)."""

    worker_id: str
    engine: EngineConfig
    kv_transport: str = "auto"
    """auto | nccl | gloo | zmq | inproc: how KV moves between prefill and decode workers."""
    host: str = "127.0.0.1"
    """Address this worker binds its KV receiver on (reachable by prefill workers)."""
    kv_max_pairs: int = 64
    """Prefill worker, torch transport: most decode workers it keeps a KV pair with (each
    NCCL communicator holds GPU memory); past it the least recently used idle pair goes."""


class EngineWorker:
    """Base of all workers: engine, loop thread, live requests, outputs, events for the router."""

    role = "colocated"

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        # A worker has its process to itself (a Ray actor): its prefill buffers, whose sizes
        # vary with every prompt, must not pile up in malloc's arenas
        # (workers/actors/host_memory.py).
        return_large_frees_to_os()
        self.worker_id = spec.worker_id
        # A fresh id per construction lets the router tell a restarted actor from the old one.
        self.incarnation = uuid.uuid4().hex
        # The role comes from the worker class, so a spec can never mismatch its worker.
        self.engine = make_engine(dataclasses.replace(spec.engine, role=self.role))
        self.sender = OutputSender()
        self.kv_events = KvEventBuffer(self.engine.prefix_cache)
        self.live: dict[str, LiveRequest] = {}
        self.let_go: OrderedDict[str, LetGo] = OrderedDict()
        """Attempts this worker let go of, newest last (loop thread only)."""
        self._routers: dict[str, float] = {}
        """News address -> when that router last checked this worker (time.monotonic())."""
        self.loop = EngineLoop(f"engine-{self.worker_id}", self._turn,
                               self.engine.has_unfinished)

    # ---- called from outside the loop thread -------------------------------------------

    def ready(self) -> dict[str, Any]:
        """Identity and model facts once the engine is loaded (the launcher waits on it)."""
        config = self.engine.model_config
        return {
            "worker_id": self.worker_id,
            "incarnation": self.incarnation,
            "role": self.role,
            "vocab_size": config.vocab_size,
            "max_model_len": self.engine.max_model_len,
            "total_blocks": self.engine.num_total_blocks,
            "block_size": self.spec.engine.cache.block_size,
            "kv_layout": kv_layout(self.engine).to_dict(),
            **shape_facts(self.engine),
        }

    def abort(self, attempt_id: str) -> LetGo:
        """Ends that placement here silently (the router has the final chunk written,
        router/final_chunk.py). Returns once no chunk of it will leave this worker again
        (its blocks free, or freed as soon as no transfer touches them), with how far this
        worker streamed it; a placement of it that comes later is refused."""

        def let_go_now() -> LetGo:
            live = self.live.get(attempt_id)
            self._abort_now(attempt_id)
            if attempt_id not in self.let_go:
                self.remember(attempt_id, LetGo(live.last_index if live else -1))
            return self.let_go[attempt_id]

        return self.loop.call(let_go_now)

    def send_final(self, address: str, chunk: OutputChunk) -> None:
        """Sends a request's final chunk (built by the router) on this worker's connection to
        the gateway, behind every chunk this worker sent before."""
        self.sender.send(address, chunk)

    def report(self, news_address: str) -> WorkerReport:
        """The router's health check: identity, liveness and load. From now on this worker
        pushes its news to `news_address`."""
        now = time.monotonic()
        # A new dict, swapped in whole: the loop thread reads it without a lock.
        self._routers = {address: seen for address, seen in self._routers.items()
                         if now - seen < _ROUTER_GONE_S} | {news_address: now}
        return WorkerReport(
            worker_id=self.worker_id,
            incarnation=self.incarnation,
            role=self.role,
            alive=self.loop.alive,
            free_blocks=self.engine.num_free_blocks,
            total_blocks=self.engine.num_total_blocks,
            num_live=len(self.live),
            kv_address=self.kv_address(),
            kv_events=self.kv_events.take(),
            prefix_cache=self.prefix_cache_stats(),
        )

    def republish_kv(self) -> None:
        """The router's index of this worker's cached blocks was lost (Redis came back
        empty): the next report lists every block held, with reset. Returns at once."""
        self.loop.call_soon(self.kv_events.republish)

    def prefix_cache_stats(self) -> dict[str, int] | None:
        """Tokens looked up in and found by the prefix cache (vLLM's prefix_cache_queries
        and prefix_cache_hits), None without one."""
        cache = self.engine.prefix_cache
        if cache is None:
            return None
        return {"queries": cache.num_queries, "hits": cache.num_hits}

    def free_blocks(self) -> int:
        return self.loop.call(lambda: self.engine.num_free_blocks)

    def shutdown(self) -> None:
        self.loop.stop()
        self.sender.close()

    # ---- loop thread ------------------------------------------------------------------

    def _turn(self) -> None:
        """One turn of the loop thread: the prefix cache's events out, one engine step, its
        outputs handled."""
        self.kv_events.collect()
        if not self.engine.has_unfinished():
            return
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step must not kill the worker silently
            log.error("engine step failed on %s:\n%s", self.worker_id, traceback.format_exc())
            self._fail_all(exc)
            return
        for output in outputs:
            if output.request_id in self.live:
                self._handle(output)

    def _handle(self, output: Any) -> None:
        try:
            self.on_output(output)
        except Exception as exc:  # one request's failure must not stop the others
            log.exception("output of %s failed on %s", output.request_id, self.worker_id)
            request = self.live[output.request_id].request
            self._abort_now(output.request_id)
            self.finish_with_error(output.request_id, exc, request)

    def add_to_engine(self, request: GenerateRequest) -> bool:
        """Admits `request` to the engine; a typed refusal ends it with an error chunk. An
        attempt aborted before it came is refused silently."""
        key = request.attempt_id
        if key in self.let_go:
            log.info("%s was aborted before it reached %s; not admitted", key, self.worker_id)
            return False
        try:
            self.live[key] = LiveRequest(request)
            self.engine.add_request(key, request.prompt_token_ids, request.sampling,
                                    request.priority, request.output_token_ids,
                                    request.sent_text_len)
        except KvrelayError as exc:
            self.finish_with_error(key, exc, request)
            return False
        except Exception as exc:  # never a request left waiting on a command that failed
            log.exception("admitting %s failed on %s", key, self.worker_id)
            self._abort_now(key)
            self.finish_with_error(key, exc, request)
            return False
        return True

    def on_output(self, output: Any) -> None:
        """Streams one RequestOutput; subclasses intercept their role's special outputs."""
        self.stream(output)

    def stream(self, output: Any, finished: bool | None = None) -> None:
        """Sends the new tokens of `output`; ends the request if it finished."""
        live = self.live[output.request_id]
        now = time.time()
        done = output.finished if finished is None else finished
        chunk = live.chunk(output, done, self.worker_id, now)
        if done:
            # Speculative decoding's counters (spec_decode_*) ride with the phase times.
            chunk.timings = self.final_timings(live, now) | output.metrics.spec
            self.end(output.request_id, WorkerEvent.FINISHED)
        self.sender.send(live.request.output_address, chunk)

    def final_timings(self, live: LiveRequest, now: float) -> dict[str, float]:
        first = live.first_token_at or now
        timings = dict(live.timings)
        timings.setdefault("queue", max(0.0, live.submitted - live.request.arrival_time))
        timings.setdefault("prefill", first - live.submitted)
        timings["decode"] = now - first
        return timings

    def finish_with_error(
        self, key: str, exc: BaseException, request: GenerateRequest | None = None
    ) -> None:
        """Ends a placement (by attempt id) with one error chunk naming the typed error; any
        other exception (logged by the caller) goes out as InternalError, its text staying
        in this log."""
        live = self.live.get(key)
        request = request or (live.request if live else None)
        if request is None:
            return
        if not isinstance(exc, KvrelayError):
            exc = InternalError(self.worker_id)
        self.live.pop(key, None)
        self.remember(key, LetGo(live.last_index if live else -1, ended=True))
        self.note(request, WorkerEvent.FAILED)
        self.sender.send(request.output_address, error_chunk(request, exc, self.worker_id))

    def end(self, key: str, event: WorkerEvent) -> None:
        """Forgets a placement here and tells the router how it ended."""
        live = self.live.pop(key, None)
        if live is not None:
            self.remember(key, LetGo(live.last_index, ended=event is WorkerEvent.FINISHED))
            self.note(live.request, event)

    def remember(self, key: str, let_go: LetGo) -> None:
        """Records how this worker let go of a placement (loop thread)."""
        self.let_go[key] = let_go
        self.let_go.move_to_end(key)
        while len(self.let_go) > _LET_GO_KEPT:
            self.let_go.popitem(last=False)

    def note(self, request: GenerateRequest, event: WorkerEvent) -> None:
        """Pushes news about a placement of `request` to every router that checked this
        worker lately (the one that placed it among them; the others ignore it). Before the
        first health check there is no router to tell, and no request either."""
        news = WorkerNews(self.worker_id, self.incarnation, request.request_id,
                          request.attempt, event)
        for address in self._routers:
            self.sender.send(address, news)

    def _abort_now(self, request_id: str) -> None:
        self.abort_transfers(request_id)
        self.engine.abort(request_id)
        self.live.pop(request_id, None)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self.live):
            self.engine.abort(request_id)
            self.finish_with_error(request_id, exc)

    # ---- KV transfer hook (prefill/decode workers override) -----------------------------

    def abort_transfers(self, request_id: str) -> None:
        """Stops any transfer of `request_id` before its blocks are freed."""

    def kv_address(self) -> str | None:
        """Where prefill workers push KV to this worker (decode workers), else None."""
        return None
