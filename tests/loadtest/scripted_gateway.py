"""kvrelay's real HTTP gateway with no tokenizer (as with `--dummy-config` random weights) over
a scripted worker: every request it accepts streams `num_tokens` chunks back over a real ZMQ
socket. What the load tester sees is what a random-weights cluster shows it."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
import zmq

from router.gateway import create_app
from workers.protocol import GenerateRequest, OutputChunk, encode

MAX_MODEL_LEN = 4096


class ScriptedWorker:
    """The gateway's Backend: answers each request with its max_tokens chunks, then finishes."""

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []
        self._context = zmq.Context()
        self._sockets: dict[str, zmq.Socket] = {}

    async def submit(self, request: GenerateRequest) -> None:
        self.requests.append(request)
        sock = self._sockets.get(request.output_address)
        if sock is None:
            sock = self._sockets[request.output_address] = self._context.socket(zmq.PUSH)
            sock.connect(request.output_address)
        n = int(request.sampling["max_tokens"])
        for i in range(n):
            sock.send(encode(OutputChunk(request.request_id, [7 + i], text_delta=f" t{i}",
                                         finished=i == n - 1,
                                         finish_reason="length" if i == n - 1 else None)))

    async def abort(self, request_id: str) -> None:
        pass

    async def health(self) -> dict[str, Any]:
        return {"workers": {"colocated": {"ready": 1, "known": 1}}}

    async def worker_metrics(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._context.term()


class TokenizerFreeGateway:
    """`with TokenizerFreeGateway() as gw:` serves at `gw.url`; `gw.worker.requests` holds what
    reached the worker."""

    def __init__(self) -> None:
        self.worker = ScriptedWorker()
        app = create_app(self.worker, None, "dummy", MAX_MODEL_LEN)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="critical", lifespan="on",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> TokenizerFreeGateway:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("gateway did not start within 10 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
        self.worker.close()
