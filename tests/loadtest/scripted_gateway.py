"""kvrelay's real HTTP gateway with no tokenizer (as with `--dummy-config` random weights) over
a scripted worker: every request it accepts streams `num_tokens` chunks back over a real ZMQ
socket. What the load tester sees is what a random-weights cluster shows it."""

from __future__ import annotations

from typing import Any

import zmq

from router.gateway import create_app
from tests.served_app import serve
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
        n = request.sampling.max_tokens
        for i in range(n):
            sock.send(encode(OutputChunk(request.request_id, [7 + i], text_delta=f" t{i}",
                                         finished=i == n - 1,
                                         finish_reason="length" if i == n - 1 else None)))

    async def abort(self, request_id: str, deadline_s: float | None = None) -> None:
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
        self._serving = serve(create_app(self.worker, None, "dummy", MAX_MODEL_LEN),
                              start_timeout_s=10)
        self.url = ""

    def __enter__(self) -> TokenizerFreeGateway:
        self.url = self._serving.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._serving.__exit__(*exc)
        self.worker.close()
