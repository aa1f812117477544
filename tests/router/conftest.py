"""A real gateway over a real single-process cluster, served by uvicorn on a free port.

`CoreBackend` (tests/cluster/helpers.py) is the gateway's Backend over a `RouterCore` (the
Router actor's plain class) whose one worker is an in-process `ColocatedWorker`: a real
LLMEngine on the tiny checkpoint, stepping in its own thread and PUSHing real OutputChunks
over ZMQ to the gateway's socket.
Only Ray is left out; everything the gateway sees is what it sees in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import zmq

from cluster.metrics import GatewayMetrics
from router.gateway import GatewayConfig, create_app
from router.router_core import RouterConfig, RouterCore
from router.worker_handle import LocalHandle
from tests.cluster.helpers import CoreBackend
from tests.served_app import serve  # noqa: F401 - re-exported for the router tests
from workers.actors.colocated_worker import ColocatedWorker
from workers.actors.worker_base import WorkerSpec
from workers.config import CacheConfig, EngineConfig
from workers.protocol import GenerateRequest, OutputChunk, encode
from workers.text.tokenizer import Tokenizer

BLOCK_SIZE = 8
NUM_BLOCKS = 64
MAX_MODEL_LEN = 256


def post(served, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(served.url + path, json=body, timeout=timeout)


def sse_payloads(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded; the '[DONE]' marker as a string."""
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


class ScriptedBackend:
    """A worker on demand for failure cases the real engine will not produce on cue: on
    submit it PUSHes `script` (chunks re-addressed to the request) over a real ZMQ socket to
    the gateway, then falls silent, like a worker that stalled or died mid-request."""

    def __init__(self, script: list[OutputChunk]):
        self.script = script
        self.submitted: list[str] = []
        self.aborted: list[str] = []
        self._context = zmq.Context()
        self._sockets: dict[str, zmq.Socket] = {}

    async def submit(self, request: GenerateRequest) -> None:
        self.submitted.append(request.request_id)
        sock = self._sockets.get(request.output_address)
        if sock is None:
            sock = self._sockets[request.output_address] = self._context.socket(zmq.PUSH)
            sock.connect(request.output_address)
        for chunk in self.script:
            sock.send(encode(dataclasses.replace(chunk, request_id=request.request_id)))

    async def abort(self, request_id: str, deadline_s: float | None = None) -> None:
        self.aborted.append(request_id)

    async def health(self) -> dict[str, Any]:
        return {"workers": {"colocated": {"ready": 1, "known": 1}}}

    async def worker_metrics(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._context.term()


def engine_config(model_dir) -> EngineConfig:
    return EngineConfig(model=str(model_dir), seed=0, max_model_len=MAX_MODEL_LEN,
                        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_core(core: RouterCore) -> None:
    asyncio.run(core.stop())  # closes the core's output sockets


@dataclass
class Served:
    url: str
    worker: ColocatedWorker
    tokenizer: Tokenizer
    metrics: GatewayMetrics
    core: RouterCore

    def free_blocks(self) -> int:
        return self.worker.free_blocks()

    def wait_all_blocks_free(self, timeout_s: float = 5.0) -> int:
        """Free blocks once they are all back (or whatever they are at the timeout)."""
        deadline = time.monotonic() + timeout_s
        while self.free_blocks() != NUM_BLOCKS and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.free_blocks()


@pytest.fixture(scope="session")
def colocated_worker(tiny_model_dir) -> Iterator[ColocatedWorker]:
    worker = ColocatedWorker(WorkerSpec("gw-colocated-0", engine_config(tiny_model_dir)))
    yield worker
    worker.shutdown()


@contextmanager
def served_gateway(worker: ColocatedWorker, model_dir, **config: Any) -> Iterator[Served]:
    """A gateway (its own RouterCore) over `worker`; `config` sets GatewayConfig fields."""
    core = RouterCore(RouterConfig(block_size=BLOCK_SIZE, poll_interval_s=0.05))
    core.add_worker(worker.worker_id, "colocated", LocalHandle(worker))
    tokenizer = Tokenizer(model_dir)
    metrics = GatewayMetrics()
    app = create_app(CoreBackend(core), tokenizer, "tiny", MAX_MODEL_LEN,
                     config=GatewayConfig(**config), metrics=metrics)
    try:
        with serve(app) as url:
            yield Served(url, worker, tokenizer, metrics, core)
    finally:
        stop_core(core)


@pytest.fixture(scope="session")
def gateway(colocated_worker, tiny_model_dir) -> Iterator[Served]:
    with served_gateway(colocated_worker, tiny_model_dir) as served:
        yield served
