"""Token order on the wire is not token order: the prefill worker sends token 1 and the
decode worker tokens 2.. and the final chunk, over two connections. Here token 1 is held back
on its way (in front of the prefill worker's real sender) until the decode worker has sent
the rest of the stream, final chunk included; the real gateway over HTTP still answers with
transformers' tokens and the same text as without the delay, streaming or not."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx

from router.gateway import create_app
from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import LocalHandle
from tests.cluster.helpers import CoreBackend, hf_greedy
from tests.served_app import serve
from workers.actors.decode_worker import DecodeWorker
from workers.actors.output_sender import OutputSender
from workers.actors.prefill_worker import PrefillWorker
from workers.actors.worker_base import WorkerSpec
from workers.config import CacheConfig, EngineConfig
from workers.protocol import OutputChunk
from workers.text.tokenizer import Tokenizer

PROMPT = [5, 17, 33, 9, 41, 12, 7, 28, 3, 60, 14]
MAX_TOKENS = 8


class WireTap:
    """In front of a worker's OutputSender: logs each chunk it sends (when, which worker,
    request, index, final) in `wire`; with `hold_first`, holds each request's token-1 chunk
    until that request's final chunk went out from the other worker (`finals`)."""

    def __init__(self, sender: OutputSender, name: str, wire: list, finals: dict,
                 hold_first: bool = False):
        self.sender = sender
        self.name = name
        self.wire = wire
        self.finals = finals
        self.hold_first = hold_first
        self.held: list[threading.Thread] = []

    def send(self, address: str, msg: Any) -> None:
        if self.hold_first and isinstance(msg, OutputChunk) and msg.index == 0:
            final = self.finals.setdefault(msg.request_id, threading.Event())
            thread = threading.Thread(target=self._send_after, args=(final, address, msg))
            self.held.append(thread)
            thread.start()
            return
        self._send(address, msg)
        if isinstance(msg, OutputChunk) and msg.finished:
            self.finals.setdefault(msg.request_id, threading.Event()).set()

    def _send_after(self, final: threading.Event, address: str, msg: OutputChunk) -> None:
        final.wait(30)
        time.sleep(0.05)
        self._send(address, msg)

    def _send(self, address: str, msg: Any) -> None:
        if isinstance(msg, OutputChunk):
            self.wire.append((time.monotonic(), self.name, msg.request_id, msg.index,
                              msg.finished))
        self.sender.send(address, msg)

    def close(self) -> None:
        self.sender.close()


def completion(url: str, stream: bool) -> tuple[list[int], str, str]:
    """(token ids, text, finish_reason) of the prompt through /v1/completions."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
            "min_tokens": MAX_TOKENS, "temperature": 0, "stream": stream,
            "return_token_ids": True}
    if not stream:
        response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["token_ids"], choice["text"], choice["finish_reason"]
    ids, text, reason = [], "", None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            ids += choice.get("token_ids") or []
            text += choice["text"]
            reason = choice["finish_reason"] or reason
    return ids, text, reason


def test_token_one_held_back_behind_the_rest_of_the_stream_still_reads_right(
    tiny_model_dir, hf_reference
):
    engine = EngineConfig(model=str(tiny_model_dir), max_model_len=256,
                          cache=CacheConfig(block_size=8, num_blocks=64))
    prefill = PrefillWorker(WorkerSpec("prefill-0", engine, kv_transport="zmq"))
    decode = DecodeWorker(WorkerSpec("decode-0", engine, kv_transport="zmq"))
    wire: list[tuple] = []
    finals: dict[str, threading.Event] = {}
    core = RouterCore(RouterConfig(block_size=8, poll_interval_s=0.05))
    core.add_worker("prefill-0", "prefill", LocalHandle(prefill))
    core.add_worker("decode-0", "decode", LocalHandle(decode))
    app = create_app(CoreBackend(core), Tokenizer(tiny_model_dir), "tiny", 256)
    expected = hf_greedy(hf_reference(tiny_model_dir), PROMPT, MAX_TOKENS)
    try:
        with serve(app) as url:
            plain = completion(url, stream=True)
            decode.sender = WireTap(decode.sender, "decode", wire, finals)
            prefill.sender = WireTap(prefill.sender, "prefill", wire, finals, hold_first=True)
            held = [completion(url, stream=True), completion(url, stream=False)]
    finally:
        asyncio.run(core.stop())
        prefill.shutdown()
        decode.shutdown()
    assert plain == (expected, plain[1], "length") and plain[1]
    assert held == [plain, plain]
    for rid in {r for _, _, r, _, _ in wire}:
        sent = [(who, index, final) for _, who, r, index, final in sorted(wire) if r == rid]
        assert sent[-1] == ("prefill", 0, False), sent  # token 1 last on the wire
        assert [s for s in sent if s[2]] == [("decode", sent[-2][1], True)], sent
