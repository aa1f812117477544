"""The OpenAI-compatible HTTP gateway: `create_app(backend, tokenizer, ...) -> FastAPI`.

Per request: validate and tokenize (router/openai_protocol.py), admit (router/admission.py),
register the id on the one ZMQ PULL socket (router/output_receiver.py), `backend.submit`,
then turn the worker's OutputChunks into one JSON body or an SSE stream (router/sse.py).
Every request ends within its deadline; a client that disconnects gets its request aborted
on the backend (so KV blocks free at once); every error is mapped in router/http_errors.py.

The gateway knows the cluster only through `Backend` (the Ray Router in production, an
in-process worker in tests) and its metrics only through `MetricsSink`
(cluster.metrics.GatewayMetrics), both handed in by the launcher.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router import http_errors, sse
from router.admission import Admission
from router.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SimpleGenerateRequest,
    chat_logprobs,
    chat_response,
    check_unsupported,
    completion_logprobs,
    completion_response,
    prompt_token_ids,
    sampling_fields,
    usage,
)
from router.output_receiver import OutputReceiver
from workers.errors import (
    EmptyPrompt,
    InvalidParameter,
    KvrelayError,
    PromptTooLong,
    RequestTimeout,
    UnknownModel,
    UnknownTokenIds,
)
from workers.protocol import GenerateRequest, OutputChunk

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the gateway needs from the cluster (implemented by router.router.RayBackend)."""

    async def submit(self, request: GenerateRequest) -> None:
        """Places the request; its chunks then arrive at `request.output_address`. Raises
        QueueFull, NoReadyWorker, NoCapacity or another typed error (workers/errors.py)."""

    async def abort(self, request_id: str) -> None:
        """Ends the request everywhere and frees its blocks; idempotent."""

    async def health(self) -> dict[str, Any]:
        """`{"workers": {role: {"ready": int, "known": int}}, ...}`."""

    async def worker_metrics(self) -> list[dict[str, Any]]:
        """One dict of numbers per worker, with its `worker_id` (free_blocks, ...)."""


class MetricsSink(Protocol):
    """What the gateway records into (implemented by cluster.metrics.GatewayMetrics)."""

    def request_done(self, endpoint: str, status: int) -> None: ...
    def set_in_flight(self, count: int) -> None: ...
    def tokens(self, prompt: int, output: int) -> None: ...
    def latency(self, ttft_s: float | None, e2e_s: float, num_output_tokens: int) -> None: ...
    def phases(self, timings: dict[str, float]) -> None: ...
    def render(self, worker_metrics: list[dict[str, Any]]) -> bytes: ...
    def snapshot(self, worker_metrics: list[dict[str, Any]]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class GatewayConfig:
    output_host: str = "127.0.0.1"
    """Where the PULL socket binds; workers on other hosts need this host's reachable IP."""
    output_port: int = 0
    """0: a free port."""
    max_in_flight: int = 1024
    """Requests admitted at once before 429 (0: no limit)."""
    request_timeout_s: float = 600.0
    """Deadline of every request (a request's own `timeout` may only shorten it)."""
    served_model_names: tuple[str, ...] = ()
    """Extra names accepted in `model` besides `model_name`."""


PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_app(
    backend: Backend,
    tokenizer: Any,
    model_name: str,
    max_model_len: int,
    *,
    config: GatewayConfig | None = None,
    metrics: MetricsSink | None = None,
) -> FastAPI:
    """The gateway app. `tokenizer` is a workers.tokenizer.Tokenizer (encode, decode,
    apply_chat_template, bos_token). Without `metrics`, /metrics answers 404."""
    config = config or GatewayConfig()
    names = (model_name, *config.served_model_names)
    gateway = _Gateway(backend, tokenizer, names, max_model_len, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.receiver.start()
        try:
            yield
        finally:
            await gateway.receiver.stop()

    app = FastAPI(title="kvrelay", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return gateway.error(request.url.path, http_errors.from_validation(exc))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await gateway.handle("/v1/completions", body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await gateway.handle("/v1/chat/completions", body, request)

    @app.post("/v1/generate")
    async def generate(body: SimpleGenerateRequest, request: Request) -> Response:
        return await gateway.handle("/v1/generate", body, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "kvrelay",
             "max_model_len": max_model_len} for name in names]}

    @app.get("/health")
    async def health() -> JSONResponse:
        state = await backend.health()
        ready = is_ready(state)
        return JSONResponse({"status": "ok" if ready else "unavailable", **state},
                            status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            return JSONResponse({"error": "metrics are not enabled"}, status_code=404)
        body = metrics.render(await backend.worker_metrics())
        return Response(body, media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/metrics")
    async def json_metrics() -> JSONResponse:
        if metrics is None:
            return JSONResponse({"error": "metrics are not enabled"}, status_code=404)
        return JSONResponse(metrics.snapshot(await backend.worker_metrics()))

    return app


def is_ready(health: dict[str, Any]) -> bool:
    """Whether a request could be placed now: a ready colocated worker, or a ready prefill
    and a ready decode worker (the Router's own placement rule)."""
    workers = health.get("workers", {})

    def ready(role: str) -> bool:
        return workers.get(role, {}).get("ready", 0) > 0

    return ready("colocated") or (ready("prefill") and ready("decode"))


_ID_PREFIX = {"/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-",
              "/v1/generate": "gen-"}


@dataclass
class _Call:
    """One request in flight at the gateway and what its chunks said so far."""

    endpoint: str
    body: Any
    request_id: str
    prompt_ids: list[int]
    sampling: dict[str, Any]
    timeout_s: float
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.time)
    queue: asyncio.Queue | None = None
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    num_output: int = 0
    first_token_at: float | None = None
    final: OutputChunk | None = None
    streamed: int = 0
    """Characters of text already streamed (offset of the next logprobs entry)."""
    ended: bool = False

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout_s

    @property
    def failed(self) -> bool:
        return self.final is not None and self.final.finish_reason in ("error", "abort")

    def absorb(self, chunk: OutputChunk) -> None:
        if chunk.new_token_ids and self.first_token_at is None:
            self.first_token_at = time.time()
        self.text += chunk.text_delta
        self.num_output += len(chunk.new_token_ids)
        self.logprobs.extend(chunk.logprobs or [])
        if chunk.finished:
            self.final = chunk

    def usage(self) -> dict[str, int]:
        return usage(len(self.prompt_ids), self.num_output)


class _Gateway:
    """The request lifecycle behind the routes: prepare, start, receive, respond, end."""

    def __init__(self, backend: Backend, tokenizer: Any, names: tuple[str, ...],
                 max_model_len: int, config: GatewayConfig, metrics: MetricsSink | None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.names = names
        self.max_model_len = max_model_len
        self.config = config
        self.metrics = metrics
        self.receiver = OutputReceiver(config.output_host, config.output_port)
        self.admission = Admission(config.max_in_flight)
        self._aborts: set[asyncio.Task] = set()

    async def handle(self, endpoint: str, body: Any, request: Request) -> Response:
        try:
            call = self._prepare(endpoint, body)
            await self._start(call)
        except KvrelayError as exc:
            return self.error(endpoint, http_errors.from_exception(exc, _param_for(exc, body)))
        try:
            chunk = await self._receive(call, request, whole=not body.stream)
        except RequestTimeout as exc:
            self._end(call, 504)
            return self.error(endpoint, http_errors.from_exception(exc), count=False)
        if chunk is None:  # the client left; nginx's 499 "client closed request"
            self._end(call, 499)
            return Response(status_code=499)
        if call.failed:
            mapped = http_errors.from_chunk(chunk.error_type, chunk.error or chunk.finish_reason)
            self._end(call, mapped.status)
            return self.error(endpoint, mapped, count=False)
        if body.stream:
            return StreamingResponse(self._events(call, chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        self._end(call, 200)
        return JSONResponse(self._body(call))

    def error(self, endpoint: str, mapped: http_errors.HttpError, count: bool = True) -> Response:
        if self.metrics is not None and count:
            self.metrics.request_done(endpoint, mapped.status)
        return mapped.response()

    def _prepare(self, endpoint: str, body: Any) -> _Call:
        if body.model and body.model not in self.names:
            raise UnknownModel(body.model, list(self.names))
        check_unsupported(body)
        if isinstance(body, SimpleGenerateRequest) and body.stream:
            raise InvalidParameter("stream", "/v1/generate does not stream; use /v1/completions")
        ids = prompt_token_ids(body, self.tokenizer)
        sampling = sampling_fields(body, len(ids), self.max_model_len)
        timeout = min(body.timeout or math.inf, self.config.request_timeout_s)
        request_id = _ID_PREFIX[endpoint] + uuid.uuid4().hex
        return _Call(endpoint, body, request_id, ids, sampling, timeout)

    async def _start(self, call: _Call) -> None:
        """Admits and submits; on any failure nothing of the request is left behind."""
        self.admission.admit()
        self._count_in_flight()
        call.queue = self.receiver.register(call.request_id)
        request = GenerateRequest(call.request_id, call.prompt_ids, call.sampling,
                                  self.receiver.address, call.body.priority, call.arrival)
        try:
            await asyncio.wait_for(self.backend.submit(request), call.deadline - time.time())
        except BaseException as exc:
            call.ended = True
            self.receiver.unregister(call.request_id)
            self.admission.release()
            self._count_in_flight()
            if not isinstance(exc, KvrelayError):  # timed out or cancelled mid-placement
                self._abort_soon(call.request_id)
            if isinstance(exc, asyncio.TimeoutError):
                raise RequestTimeout(call.timeout_s) from None
            raise

    async def _next(self, call: _Call) -> OutputChunk:
        assert call.queue is not None
        try:
            chunk = await asyncio.wait_for(call.queue.get(), call.deadline - time.time())
        except asyncio.TimeoutError:
            raise RequestTimeout(call.timeout_s, call.num_output) from None
        call.absorb(chunk)
        return chunk

    async def _receive(self, call: _Call, request: Request, whole: bool) -> OutputChunk | None:
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

    async def _events(self, call: _Call, first: OutputChunk) -> AsyncIterator[bytes]:
        """The SSE body. Its `finally` runs on completion, on error and when the client
        disconnects (Starlette cancels the stream), so `_end` always aborts what is left."""
        status = 499
        try:
            if isinstance(call.body, ChatCompletionRequest):
                yield sse.event(self._chunk(call, {"role": "assistant", "content": ""}))
            chunk = first
            while True:
                if call.failed:
                    mapped = http_errors.from_chunk(chunk.error_type,
                                                    chunk.error or chunk.finish_reason)
                    status = mapped.status
                    yield sse.error_event(mapped.body)
                    break
                payload = self._delta(call, chunk)
                if payload is not None:
                    yield sse.event(payload)
                if chunk.finished:
                    status = 200
                    if _include_usage(call.body):
                        yield sse.event(sse.usage_chunk(call.request_id, _object(call.body),
                                                        call.created, self._model(call),
                                                        call.usage()))
                    break
                chunk = await self._next(call)
            yield sse.DONE
        except RequestTimeout as exc:
            status = 504
            yield sse.error_event(http_errors.from_exception(exc).body)
            yield sse.DONE
        finally:
            self._end(call, status)

    def _delta(self, call: _Call, chunk: OutputChunk) -> dict[str, Any] | None:
        """The stream chunk for one OutputChunk; None when it carries nothing to show."""
        text, entries = chunk.text_delta, chunk.logprobs or []
        finish = chunk.finish_reason if chunk.finished else None
        if not text and not entries and finish is None:
            return None
        if isinstance(call.body, ChatCompletionRequest):
            logprobs = chat_logprobs(entries, self._token_text) if call.body.logprobs else None
            payload = self._chunk(call, {"content": text} if text else {}, logprobs, finish)
        else:
            logprobs = None
            if call.body.logprobs is not None:
                logprobs = completion_logprobs(entries, self._token_text, call.streamed)
            payload = self._chunk(call, text, logprobs, finish)
        call.streamed += len(text)
        return payload

    def _chunk(self, call: _Call, content: Any, logprobs: dict[str, Any] | None = None,
               finish: str | None = None) -> dict[str, Any]:
        model = self._model(call)
        if isinstance(call.body, ChatCompletionRequest):
            payload = sse.chat_chunk(call.request_id, call.created, model, content, logprobs,
                                     finish)
        else:
            payload = sse.completion_chunk(call.request_id, call.created, model, content,
                                           logprobs, finish)
        if _include_usage(call.body):
            payload["usage"] = None  # OpenAI: null on every chunk but the last
        return payload

    def _body(self, call: _Call) -> dict[str, Any]:
        """The non-streaming response of a finished request."""
        assert call.final is not None
        body, finish, model = call.body, call.final.finish_reason, self._model(call)
        if isinstance(body, SimpleGenerateRequest):
            latency = time.time() - call.arrival
            return {"id": call.request_id, "text": call.text, "tokens_generated": call.num_output,
                    "prompt_tokens": len(call.prompt_ids), "finish_reason": finish,
                    "latency_ms": latency * 1000.0,
                    "tokens_per_second": call.num_output / latency if latency > 0 else 0.0}
        if isinstance(body, ChatCompletionRequest):
            logprobs = chat_logprobs(call.logprobs, self._token_text) if body.logprobs else None
            return chat_response(call.request_id, call.created, model, call.text, logprobs,
                                 finish, call.usage())
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(call.logprobs, self._token_text)
        return completion_response(call.request_id, call.created, model, call.text, logprobs,
                                   finish, call.usage())

    def _end(self, call: _Call, status: int) -> None:
        """Releases everything the request held at the gateway, once; aborts it on the
        backend unless it finished there; records its metrics."""
        if call.ended:
            return
        call.ended = True
        self.receiver.unregister(call.request_id)
        e2e = time.time() - call.arrival
        self.admission.release(e2e if status == 200 else None)
        if call.final is None:
            self._abort_soon(call.request_id)
        self._count_in_flight()
        if self.metrics is None:
            return
        self.metrics.request_done(call.endpoint, status)
        if status == 200:
            ttft = call.first_token_at - call.arrival if call.first_token_at else None
            self.metrics.tokens(len(call.prompt_ids), call.num_output)
            self.metrics.latency(ttft, e2e, call.num_output)
            self.metrics.phases(call.final.timings if call.final else {})

    def _abort_soon(self, request_id: str) -> None:
        # A task, not an await: this runs in `finally` blocks of cancelled handlers.
        task = asyncio.get_running_loop().create_task(self._abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.backend.abort(request_id)
        except Exception:  # the request is gone from the gateway either way
            log.exception("abort of %s failed", request_id)

    def _count_in_flight(self) -> None:
        if self.metrics is not None:
            self.metrics.set_in_flight(self.admission.in_flight)

    def _model(self, call: _Call) -> str:
        return call.body.model or self.names[0]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _param_for(exc: KvrelayError, body: Any) -> str | None:
    """The request field an error is about, where the error itself cannot know it."""
    if isinstance(exc, UnknownModel):
        return "model"
    if isinstance(exc, (PromptTooLong, EmptyPrompt, UnknownTokenIds)):
        return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    return None


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _object(body: Any) -> str:
    return "chat.completion.chunk" if isinstance(body, ChatCompletionRequest) else "text_completion"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read, so the
    next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
