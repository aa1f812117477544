"""The OpenAI-compatible HTTP gateway: `create_app(backend, tokenizer, ...) -> FastAPI`.

Routes, their interfaces and configuration live here; one request's life (validate, admit,
submit, stream or collect, end) is router/request_flow.py. Every request ends within its
deadline; a client that disconnects gets its request aborted on the backend (so KV blocks
free at once); every error is mapped in router/http_errors.py.

The gateway knows the cluster only through `Backend` (the Ray Router in production, an
in-process worker in tests) and its metrics only through `MetricsSink`
(cluster.metrics.GatewayMetrics), both handed in by the launcher.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from router import http_errors
from router.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from router.health_watch import HealthWatch
from router.request_flow import RequestFlow, new_request_id
from router.request_models import ChatCompletionRequest, CompletionRequest, SimpleGenerateRequest
from workers.errors import KvrelayError
from workers.protocol import GenerateRequest

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the gateway needs from the cluster (implemented by router.router.RayBackend)."""

    async def submit(self, request: GenerateRequest) -> None:
        """Places the request; its chunks then arrive at `request.output_address`. Raises
        QueueFull, NoReadyWorker, NoCapacity or another typed error (workers/errors.py)."""

    async def abort(self, request_id: str, deadline_s: float | None = None) -> None:
        """Ends the request everywhere and frees its blocks; idempotent. `deadline_s`: it
        ended because its deadline passed (not because the client left)."""

    async def resume(self, request: GenerateRequest) -> None:
        """Places the continuation of a request whose worker was lost, which the router asked
        for with a `Resume` (router/stream_resume.py); a failure ends it with an error chunk."""

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
    def migrated(self, added_s: float) -> None: ...
    def render(self, worker_metrics: list[dict[str, Any]]) -> bytes: ...
    def snapshot(self, worker_metrics: list[dict[str, Any]]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class GatewayConfig:
    output_host: str = "127.0.0.1"
    """Where the PULL socket binds; workers on other hosts need this host's reachable IP."""
    output_port: int = 0
    """0: a free port."""
    output_advertise_host: str | None = None
    """Host workers connect to; None: `output_host`, or this machine's address when
    `output_host` is a wildcard (0.0.0.0)."""
    max_in_flight: int = 1024
    """Requests admitted at once before 429 (0: no limit)."""
    request_timeout_s: float = 600.0
    """Deadline of every request (a request's own `timeout` may only shorten it)."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Larger request bodies get 413 before they are read or parsed (router/body_limit.py);
    0: no limit."""
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
    """The gateway app. `tokenizer` is a workers.text.tokenizer.Tokenizer (encode, decode,
    apply_chat_template, bos_token). Without `metrics`, /metrics answers 404 and /v1/metrics
    has only the gateway's and the workers' own numbers."""
    config = config or GatewayConfig()
    names = (model_name, *config.served_model_names)
    gateway = RequestFlow(backend, tokenizer, names, max_model_len, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.receiver.start()
        try:
            yield
        finally:
            gateway.close()
            await gateway.receiver.stop()

    app = FastAPI(title="kvrelay", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return gateway.error(request.url.path, http_errors.from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return http_errors.from_http_status(exc.status_code, exc.detail).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):  # a bug: OpenAI-shaped 500
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        rid = new_request_id(request.url.path)
        return http_errors.from_exception(exc, request_id=rid).response()

    _add_generation_routes(app, gateway)
    _add_status_routes(app, gateway, max_model_len)
    return app


def _add_generation_routes(app: FastAPI, gateway: RequestFlow) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await gateway.handle("/v1/completions", body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await gateway.handle("/v1/chat/completions", body, request)

    @app.post("/v1/generate")
    async def generate(body: SimpleGenerateRequest, request: Request) -> Response:
        return await gateway.handle("/v1/generate", body, request)


def _add_status_routes(app: FastAPI, gateway: RequestFlow, max_model_len: int) -> None:
    backend, names, metrics = gateway.backend, gateway.names, gateway.metrics
    watch = HealthWatch(backend.health)  # probes answered from memory (router/health_watch.py)

    async def workers_or_none() -> list[dict[str, Any]]:
        # The gateway's own numbers stay scrapable while the Router is down.
        try:
            return await backend.worker_metrics()
        except Exception:
            log.exception("worker metrics unavailable")
            return []

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        # vLLM's shape: `root` is the model every served name maps to, `parent` a base model
        # of an adapter (none here); `vllm bench serve` reads `root`.
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "kvrelay",
             "root": names[0], "parent": None, "max_model_len": max_model_len}
            for name in names]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if gateway.drain.closed:  # shutting down: load balancers should send no more
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        try:
            state = await watch.get()
        except Exception as exc:  # the Router itself is unreachable: not ready, say why
            if not isinstance(exc, KvrelayError):  # Ray's text (pids, addresses): log only
                log.exception("health check failed")
            reason = str(exc) if isinstance(exc, KvrelayError) else "internal error"
            return JSONResponse({"status": "unavailable", "error": reason}, status_code=503)
        ready = is_ready(state)
        return JSONResponse({"status": "ok" if ready else "unavailable", **state},
                            status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            return JSONResponse({"error": "metrics are not enabled"}, status_code=404)
        body = metrics.render(await workers_or_none())
        return Response(body, media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/metrics")
    async def json_metrics() -> JSONResponse:
        workers = await workers_or_none()
        snapshot = metrics.snapshot(workers) if metrics is not None else {"workers": workers}
        return JSONResponse({**snapshot, "gateway": gateway.stats()})


def is_ready(health: dict[str, Any]) -> bool:
    """Whether a request could be placed now: a ready colocated worker, or a ready prefill
    and a ready decode worker (the Router's own placement rule)."""
    workers = health.get("workers", {})

    def ready(role: str) -> bool:
        return workers.get(role, {}).get("ready", 0) > 0

    return ready("colocated") or (ready("prefill") and ready("decode"))
