"""A real cluster behind real HTTP for the e2e tests: Ray actors, the Router, and the gateway
served by uvicorn on a free port in a background thread of the test process; plus the client
side (`run_workload`) and the no-leak check (`wait_blocks_free`)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import ray
import uvicorn

from cluster.config import ClusterConfig
from cluster.gateway_app import build_app
from cluster.launcher import Cluster, launch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(config: ClusterConfig) -> Iterator[tuple[str, Cluster]]:
    """Launches `config` on the running Ray and serves its gateway; yields (base URL, cluster)."""
    assert ray.is_initialized(), "start Ray in a module fixture first"
    cluster = launch(config)
    try:
        app = build_app(config, cluster.router, cluster.max_model_len, cluster.ranks)
        with serving(app) as url:
            yield url, cluster
    finally:
        cluster.shutdown()


@contextmanager
def serving(app) -> Iterator[str]:
    """Runs an ASGI app on uvicorn on a free port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health not ready in {timeout_s} s")


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON events of a 200 SSE response (no [DONE]), none of them an error."""
    assert response.status_code == 200
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        assert "error" not in event, event
        yield event


async def complete(client: httpx.AsyncClient, prompt, max_tokens: int, stream: bool,
                   **extra) -> tuple[str, int, str | None]:
    """(text, completion tokens, finish_reason) of one /v1/completions call."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream, **extra}
    if not stream:
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        choice = data["choices"][0]
        return choice["text"], data["usage"]["completion_tokens"], choice["finish_reason"]
    body["stream_options"] = {"include_usage": True}
    text, tokens, reason = "", 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for event in sse_events(response):
            for choice in event.get("choices", []):
                text += choice["text"]
                reason = choice["finish_reason"] or reason
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return text, tokens, reason


def run_workload(url: str, workload) -> None:
    async def main() -> list:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(complete(client, p, n, s)
                                          for p, n, s, _ in workload))

    results = asyncio.run(main())
    for (prompt, max_tokens, stream, expected), (text, tokens, reason) in zip(
            workload, results, strict=True):
        assert text == expected, f"prompt {prompt} stream={stream}"
        assert tokens == max_tokens and reason == "length"


def wait_blocks_free(cluster, timeout_s: float = 5.0) -> float:
    start = time.monotonic()
    totals = [cluster.infos[w]["total_blocks"] for w in cluster.workers]
    while True:
        free = [cluster.call(w, "free_blocks") for w in cluster.workers]
        if free == totals:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"free {free} of {totals}"
        time.sleep(0.05)
