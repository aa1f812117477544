"""One request's life at the gateway: prepare, admit, submit, receive, respond, end.

Validate and tokenize (router/openai_protocol.py), admit (router/admission.py), register the
id on the one ZMQ PULL socket (router/output_receiver.py), `backend.submit`, then turn the
worker's OutputChunks (gathered in a `Call`, router/gateway_call.py) into one JSON body or
an SSE stream (router/responses.py). `_end` runs exactly once per admitted request, whatever
happened (done, error, deadline, client gone): it frees the admission slot and the receiver's
queue, aborts the request on the backend unless it finished there, and records its metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router import http_errors
from router.admission import Admission
from router.drain import CUT, Drain, ShuttingDown
from router.gateway_call import Call
from router.openai_protocol import (
    check_request,
    prompt_token_ids,
    sampling_params,
)
from router.output_receiver import OutputReceiver
from router.responses import Responses, cut_short, param_for
from router.stream_resume import StreamResume
from workers.errors import (
    KvrelayError,
    RequestTimeout,
    UnknownModel,
)
from workers.protocol import GenerateRequest, OutputChunk

if TYPE_CHECKING:
    from router.gateway import Backend, GatewayConfig, MetricsSink

log = logging.getLogger(__name__)

# Threads that validate and tokenize requests (chat template, HF tokenizers, which release
# the GIL), so a huge prompt never stalls the event loop; a few, so one such prompt does not
# hold up every other request's tokenization either.
_PREPARE_THREADS = 4

_ID_PREFIX = {"/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-",
              "/v1/generate": "gen-"}


class RequestFlow:
    """The request lifecycle behind the routes: prepare, start, receive, respond, end."""

    def __init__(self, backend: Backend, tokenizer: Any, names: tuple[str, ...],
                 max_model_len: int, config: GatewayConfig, metrics: MetricsSink | None):
        self.backend = backend
        # A prompt past the context is refused as soon as it is tokenized, before its ids
        # become a Python list (a 5 MB prompt's ~2M ids hold the GIL for ~0.1-0.25 s).
        self.tokenizer = tokenizer.limited(max_model_len - 1) if tokenizer else tokenizer
        self.names = names
        self.responses = Responses(self.tokenizer, names)
        self.max_model_len = max_model_len
        self.config = config
        self.metrics = metrics
        self.receiver = OutputReceiver(config.output_host, config.output_port,
                                       config.output_advertise_host)
        self.admission = Admission(config.max_in_flight)
        self.drain = Drain()
        self._prepare_pool = ThreadPoolExecutor(_PREPARE_THREADS, "gateway-prepare")

    async def handle(self, endpoint: str, body: Any, request: Request) -> Response:
        call = None
        try:
            loop = asyncio.get_running_loop()
            call = await loop.run_in_executor(self._prepare_pool, self._prepare, endpoint, body)
            await self._start(call)
        except ShuttingDown as exc:
            return self.error(endpoint, exc.http_error())
        except KvrelayError as exc:
            rid = call.request_id if call else None
            param = param_for(type(exc).__name__, body)
            return self.error(endpoint, http_errors.from_exception(exc, param, rid))
        except Exception as exc:  # a bug: 500 naming the request id, the details logged
            rid = call.request_id if call else new_request_id(endpoint)
            log.exception("%s request %s failed", endpoint, rid)
            return self.error(endpoint, http_errors.from_exception(exc, request_id=rid))
        try:
            chunk = await self._receive(call, request, whole=not body.stream)
        except (RequestTimeout, ShuttingDown) as exc:
            mapped = cut_short(exc)
            self._end(call, mapped.status)
            return self.error(endpoint, mapped, count=False)
        if chunk is None:  # the client left; nginx's 499 "client closed request"
            self._end(call, 499)
            return Response(status_code=499)
        if call.failed:
            mapped = self.responses.chunk_error(call, chunk)
            self._end(call, mapped.status)
            return self.error(endpoint, mapped, count=False)
        if body.stream:
            events = self.responses.events(call, chunk, self._next, self._end)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        self._end(call, 200)
        return JSONResponse(self.responses.body(call))

    def close(self) -> None:
        """Stops the prepare threads (a tokenization under way finishes unseen)."""
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, float]:
        """The gateway's own counters, for /v1/metrics."""
        admission = self.admission
        return {"in_flight": admission.in_flight, "max_in_flight": admission.max_in_flight,
                "refused": admission.refused, "retry_after_s": admission.retry_after(),
                "chunks_received": self.receiver.received,
                "chunks_dropped": self.receiver.dropped}

    def error(self, endpoint: str, mapped: http_errors.HttpError, count: bool = True) -> Response:
        if mapped.status >= 500:
            log.error("%s -> %d: %s", endpoint, mapped.status, mapped.body["error"]["message"])
        if self.metrics is not None and count:
            self.metrics.request_done(endpoint, mapped.status)
        return mapped.response()

    def _prepare(self, endpoint: str, body: Any) -> Call:
        if body.model and body.model not in self.names:
            raise UnknownModel(body.model, list(self.names))
        check_request(body)
        ids = prompt_token_ids(body, self.tokenizer)
        sampling = sampling_params(body, len(ids), self.max_model_len)
        timeout = min(body.timeout or math.inf, self.config.request_timeout_s)
        return Call(endpoint, body, new_request_id(endpoint), ids, sampling, timeout)

    async def _start(self, call: Call) -> None:
        """Admits and submits; on any failure nothing of the request is left behind."""
        self.drain.check_open()
        self.admission.admit()
        self._count_in_flight()
        request = GenerateRequest(call.request_id, call.prompt_ids, call.sampling,
                                  self.receiver.address, call.body.priority, call.arrival)
        # After a worker loss the router asks for a continuation (router/stream_resume.py).
        call.queue = self.receiver.register(
            call.request_id, StreamResume(self.backend, request, self.metrics))
        self.drain.add(call.request_id, call)
        try:
            await asyncio.wait_for(self.backend.submit(request), call.deadline - time.time())
        except BaseException as exc:
            call.ended = True
            self.receiver.unregister(call.request_id)
            self.drain.discard(call.request_id)
            self.admission.release()
            self._count_in_flight()
            if not isinstance(exc, KvrelayError):  # timed out or cancelled mid-placement
                self._abort_soon(call.request_id)
            if isinstance(exc, asyncio.TimeoutError):
                raise RequestTimeout(call.timeout_s) from None
            raise

    async def _next(self, call: Call) -> OutputChunk:
        assert call.queue is not None
        try:
            chunk = await asyncio.wait_for(call.queue.get(), call.deadline - time.time())
        except asyncio.TimeoutError:
            raise RequestTimeout(call.timeout_s, call.num_output) from None
        if chunk is CUT:
            raise ShuttingDown()
        call.absorb(chunk)
        return chunk

    async def _receive(self, call: Call, request: Request, whole: bool) -> OutputChunk | None:
        """The final chunk (`whole`) or the first one; None if the client disconnected first.
        Raises RequestTimeout at the deadline."""

        async def pump() -> OutputChunk:
            chunk = await self._next(call)
            while whole and not chunk.finished:
                chunk = await self._next(call)
            return chunk

        pumping = asyncio.ensure_future(pump())
        leaving = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({pumping, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pumping.cancel()
            leaving.cancel()
        if pumping.done() and not pumping.cancelled():
            return pumping.result()
        return None

    def _end(self, call: Call, status: int) -> None:
        """Releases everything the request held at the gateway, once; aborts it on the
        backend unless it finished there; records its metrics."""
        if call.ended:
            return
        call.ended = True
        self.receiver.unregister(call.request_id)
        self.drain.discard(call.request_id)
        e2e = time.time() - call.arrival
        self.admission.release(e2e if status == 200 else None)
        if call.final is None:
            self._abort_soon(call.request_id, call.timeout_s if status == 504 else None)
        self._count_in_flight()
        if self.metrics is None:
            return
        self.metrics.request_done(call.endpoint, status)
        if status == 200:
            ttft = call.first_token_at - call.arrival if call.first_token_at else None
            self.metrics.tokens(len(call.prompt_ids), call.num_output)
            self.metrics.latency(ttft, e2e, call.num_output)
            self.metrics.phases(call.final.timings if call.final else {})

    def _abort_soon(self, request_id: str, deadline_s: float | None = None) -> None:
        # A task, not an await: this runs in `finally` blocks of cancelled handlers.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a stream finalized after its loop stopped: the server is gone
            log.warning("no event loop left to abort %s", request_id)
            return
        self.drain.track_abort(loop.create_task(self._abort(request_id, deadline_s)))

    async def _abort(self, request_id: str, deadline_s: float | None) -> None:
        try:
            # With a deadline the router ends it as DeadlinePassed, not as a client gone.
            await self.backend.abort(request_id, deadline_s)
        except Exception:  # the request is gone from the gateway either way
            log.exception("abort of %s failed", request_id)

    def _count_in_flight(self) -> None:
        if self.metrics is not None:
            self.metrics.set_in_flight(self.admission.in_flight)



def new_request_id(endpoint: str) -> str:
    return _ID_PREFIX.get(endpoint, "req-") + uuid.uuid4().hex


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read, so the
    next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
