"""A worker: one LLMEngine driven by its own loop thread, streaming outputs over ZMQ.

The engine is not thread-safe, so every engine call runs in the loop thread: public methods
(called from Ray's actor threads or from a test) post closures to a queue and, where they need
an answer, wait on a Future. Outputs leave as `OutputChunk`s PUSHed to the request's gateway
address, never as Ray calls per token. The router checks health and load with `report()`
and learns how each request goes from `WorkerNews` this worker pushes to it as it happens
(`note`).

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
import queue
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from workers.actors.host_memory import return_large_frees_to_os
from workers.actors.kv_endpoint import kv_layout
from workers.actors.kv_event_buffer import KvEventBuffer
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

# How long the idle loop waits on its inbox before checking `_running` again. Commands and
# KV-transfer callbacks post to the inbox, so they wake it at once.
_IDLE_WAIT_S = 0.05
# A command that takes longer than this in the loop thread is a bug (e.g. a deadlock).
_CALL_TIMEOUT_S = 60.0
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


@dataclass
class LiveRequest:
    """A request this worker currently owns the output stream of."""

    request: GenerateRequest
    submitted: float = field(default_factory=time.time)
    first_token_at: float | None = None
    num_output_tokens: int = field(init=False)
    """Output tokens the client has (or will have) so far; starts at the request's
    resume_index."""
    timings: dict[str, float] = field(default_factory=dict)
    last_index: int = -1
    """Index of the last output token this worker streamed itself; -1: none yet."""

    def __post_init__(self) -> None:
        self.num_output_tokens = self.request.resume_index


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
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._news_address: str | None = None
        """Where the router takes this worker's news (from its last `report` call)."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.worker_id}")
        self._thread.daemon = True
        self._thread.start()

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

        return self.call(let_go_now)

    def send_final(self, address: str, chunk: OutputChunk) -> None:
        """Sends a request's final chunk (built by the router) on this worker's connection to
        the gateway, behind every chunk this worker sent before."""
        self.sender.send(address, chunk)

    def report(self, news_address: str) -> WorkerReport:
        """The router's health check: identity, liveness and load. From now on this worker
        pushes its news to `news_address`."""
        self._news_address = news_address
        return WorkerReport(
            worker_id=self.worker_id,
            incarnation=self.incarnation,
            role=self.role,
            alive=self._thread.is_alive(),
            free_blocks=self.engine.num_free_blocks,
            total_blocks=self.engine.num_total_blocks,
            num_live=len(self.live),
            kv_address=self.kv_address(),
            kv_events=self.kv_events.take(),
            prefix_cache=self.prefix_cache_stats(),
        )

    def prefix_cache_stats(self) -> dict[str, int] | None:
        """Tokens looked up in and found by the prefix cache (vLLM's prefix_cache_queries
        and prefix_cache_hits), None without one."""
        cache = self.engine.prefix_cache
        if cache is None:
            return None
        return {"queries": cache.num_queries, "hits": cache.num_hits}

    def free_blocks(self) -> int:
        return self.call(lambda: self.engine.num_free_blocks)

    def shutdown(self) -> None:
        self._running = False
        self._thread.join(timeout=5)
        self.sender.close()

    def call(self, fn: Callable[[], Any], timeout: float = _CALL_TIMEOUT_S) -> Any:
        """Runs `fn` in the loop thread and returns its result (or raises its error)."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, not swallowed
                future.set_exception(exc)

        self._inbox.put(run)
        return future.result(timeout=timeout)

    def on_loop(self, fn: Callable[[], None]) -> None:
        """Runs `fn` now if this is the loop thread, else soon in it (`call_soon`)."""
        if threading.current_thread() is self._thread:
            fn()
        else:
            self.call_soon(fn)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Runs `fn` in the loop thread later; an error is logged, never kills the loop."""

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("command failed on %s", self.worker_id)

        self._inbox.put(run)

    # ---- loop thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            self.kv_events.collect()
            self._drain_inbox(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step must not kill the worker silently
                log.error("engine step failed on %s:\n%s", self.worker_id, traceback.format_exc())
                self._fail_all(exc)
                continue
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

    def _drain_inbox(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return

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
        if output.new_token_ids and live.first_token_at is None:
            live.first_token_at = now
        index = live.num_output_tokens
        live.num_output_tokens += len(output.new_token_ids)
        if output.new_token_ids:
            live.last_index = live.num_output_tokens - 1
        done = output.finished if finished is None else finished
        chunk = OutputChunk(
            request_id=live.request.request_id,
            new_token_ids=list(output.new_token_ids),
            text_delta=output.text_delta or "",
            finished=done,
            finish_reason=output.finish_reason if done else None,
            logprobs=output.logprobs,
            num_prompt_tokens=output.num_prompt_tokens,
            num_output_tokens=live.num_output_tokens,
            num_cached_tokens=output.num_cached_tokens,
            index=index if output.new_token_ids else None,
            worker_id=self.worker_id,
            attempt=live.request.attempt,
        )
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
        self.sender.send(
            request.output_address,
            OutputChunk(
                request_id=request.request_id,
                finished=True,
                finish_reason="error",
                error=str(exc),
                error_type=type(exc).__name__,
                error_param=getattr(exc, "field", None),
                num_prompt_tokens=len(request.prompt_token_ids),
                worker_id=self.worker_id,
                attempt=request.attempt,
            ),
        )

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
        """Pushes news about a placement of `request` to the router. Before the first health
        check there is no router to tell, and no request either."""
        address = self._news_address
        if address is not None:
            self.sender.send(address, WorkerNews(self.worker_id, self.incarnation,
                                                 request.request_id, request.attempt, event))

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
