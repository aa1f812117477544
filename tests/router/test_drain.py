"""Graceful shutdown of the gateway (router/drain.py, cluster/graceful.py) over real HTTP: the
GracefulServer runs in a thread and gets SIGTERM the way its signal handler would. Streams in
flight finish while new requests get 503; at the drain timeout (or a second signal) what is
left ends with an error event and [DONE] and is aborted on the backend."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from cluster.graceful import GracefulServer
from router.gateway import create_app
from router.router_core import RouterConfig, RouterCore
from router.worker_handle import LocalHandle
from tests.router.conftest import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    NUM_BLOCKS,
    CoreBackend,
    ScriptedBackend,
    free_port,
    sse_payloads,
    stop_core,
)
from workers.protocol import OutputChunk
from workers.text.tokenizer import Tokenizer


@contextmanager
def graceful(app, drain_timeout_s: float) -> Iterator[tuple[str, GracefulServer, threading.Thread]]:
    port = free_port()
    config = uvicorn.Config(app, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = GracefulServer(config, app.state.gateway.drain, drain_timeout_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(10)


async def stream(client: httpx.AsyncClient, started: asyncio.Event, max_tokens: int) -> list:
    """One streamed completion's SSE payloads; sets `started` at its first event."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    text = ""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                text += line + "\n"
                started.set()
    finally:
        started.set()
    return sse_payloads(text.replace("\n", "\n\n"))


def signal_after_streams_start(url: str, server: GracefulServer, count: int, max_tokens: int,
                               signals: int = 1) -> tuple[list, list[httpx.Response]]:
    """Starts `count` streams; once each has an event sends SIGTERM, posts a new request and
    reads /health, then sends the other `signals`; returns the streams' payloads and those two
    responses."""

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            assert (await client.get("/health")).status_code == 200  # the worker is ready
            started = [asyncio.Event() for _ in range(count)]
            streams = [asyncio.ensure_future(stream(client, s, max_tokens)) for s in started]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 30)
            assert len(server.drain) == count, "a stream ended before the signal"
            server.handle_exit(signal.SIGTERM, None)
            await asyncio.sleep(0.3)  # the server acts on a signal within 0.1 s
            late = [await client.post("/v1/completions", json={"model": "tiny",
                                                                "prompt": [5], "max_tokens": 1}),
                    await client.get("/health")]
            for _ in range(signals - 1):
                server.handle_exit(signal.SIGINT, None)
            return await asyncio.gather(*streams), late

    return asyncio.run(main())


def test_sigterm_lets_streams_finish_and_refuses_new_requests(colocated_worker, tiny_model_dir):
    core = RouterCore(RouterConfig(block_size=BLOCK_SIZE, poll_interval_s=0.05))
    core.add_worker(colocated_worker.worker_id, "colocated", LocalHandle(colocated_worker))
    app = create_app(CoreBackend(core), Tokenizer(tiny_model_dir), "tiny", MAX_MODEL_LEN)
    try:
        with graceful(app, drain_timeout_s=60) as (url, server, thread):
            streams, (new, health) = signal_after_streams_start(url, server, 3, max_tokens=200)
            thread.join(10)
            assert not thread.is_alive(), "the server did not stop after the drain"
    finally:
        stop_core(core)
    assert new.status_code == 503 and new.headers.get("retry-after")
    assert new.json()["error"]["code"] == "shutting_down"
    assert "shutting down" in new.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "shutting_down"
    for payloads in streams:
        assert payloads[-1] == "[DONE]" and not any("error" in p for p in payloads[:-1])
        assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert colocated_worker.free_blocks() == NUM_BLOCKS


@pytest.mark.parametrize(("drain_timeout_s", "signals"), [(0.5, 1), (60, 2)],
                         ids=["drain-timeout", "second-signal"])
def test_streams_left_at_the_cut_get_error_and_done_and_are_aborted(drain_timeout_s, signals):
    """A worker that stalls after token 1 (ScriptedBackend): its streams outlive any drain."""
    backend = ScriptedBackend([OutputChunk("", new_token_ids=[7], text_delta="x")])
    app = create_app(backend, None, "tiny", MAX_MODEL_LEN)
    start = time.monotonic()
    try:
        with graceful(app, drain_timeout_s) as (url, server, thread):
            streams, (new, _) = signal_after_streams_start(url, server, 2, 5, signals)
            thread.join(10)
            assert not thread.is_alive()
    finally:
        backend.close()
    assert time.monotonic() - start < min(drain_timeout_s, 5) + 10
    assert new.status_code == 503
    for payloads in streams:
        assert payloads[-1] == "[DONE]"
        error = payloads[-2]["error"]
        assert "shutting down" in error["message"] and error["type"].startswith("service")
    assert sorted(backend.aborted) == sorted(backend.submitted) and len(backend.submitted) == 2
