"""A real cluster behind real HTTP for the e2e tests: Ray actors, the Router, and the gateway
served by uvicorn on a free port in a background thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
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
        app = build_app(config, cluster.router, cluster.max_model_len)
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
