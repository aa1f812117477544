"""A small but real streaming OpenAI-compatible server for the load tester's tests.

FastAPI + uvicorn on a free loopback port, in a thread. It streams real SSE chunks with real
delays and reports usage when asked (`stream_options.include_usage`). Its "tokenizer" is
whitespace words (a token-id prompt is its ids), so tests know the true prompt_tokens.
Directive words in a prompt pick a behaviour, so a test knows which request should fail and
how:
  FAIL503      -> HTTP 503 with an OpenAI-style error body
  BREAK        -> two tokens, then the connection drops mid-stream
  STREAMERROR  -> two tokens, then an error object inside the stream
  SLEEP        -> stalls `sleep_s` before the first token (for timeouts)
  SHORT        -> one output token, finish_reason "stop"
Every other request streams exactly max_tokens tokens (finish_reason "length").
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.served_app import serve


@dataclass(frozen=True)
class Behaviour:
    ttft_s: float = 0.02
    itl_s: float = 0.004
    send_usage: bool = True
    sleep_s: float = 3.0


class MidStreamFailure(RuntimeError):
    """Raised inside the body generator: uvicorn then drops the connection (a broken stream)."""


def _chunk(body: dict, index: int, text: str, finish: str | None, role: bool = False) -> bytes:
    if "messages" in body:
        delta = {"content": text} if text else {"role": "assistant"} if role else {}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        obj = "text_completion"
    data = {"id": f"req-{index}", "object": obj, "model": body["model"], "choices": [choice]}
    return f"data: {json.dumps(data)}\n\n".encode()


def _prompt_text(body: dict) -> str:
    if "messages" in body:
        return " ".join(m["content"] for m in body["messages"])
    prompt = body["prompt"]
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


async def _stream(body: dict, behaviour: Behaviour, index: int):
    prompt = _prompt_text(body)
    words = prompt.split()
    n_out = 1 if "SHORT" in words else int(body["max_tokens"])
    await asyncio.sleep(behaviour.sleep_s if "SLEEP" in words else behaviour.ttft_s)
    if "messages" in body:  # OpenAI chat streams open with a role-only chunk
        yield _chunk(body, index, "", None, role=True)
    for i in range(n_out):
        if i == 2 and "BREAK" in words:
            raise MidStreamFailure("test server drops the connection on purpose")
        if i == 2 and "STREAMERROR" in words:
            error = {"error": {"message": "engine failed", "type": "server_error", "code": 500}}
            yield f"data: {json.dumps(error)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            return
        if i:
            await asyncio.sleep(behaviour.itl_s)
        yield _chunk(body, index, f" tok{i}", None)
    yield _chunk(body, index, "", "stop" if "SHORT" in words else "length")
    if behaviour.send_usage and (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": len(words), "completion_tokens": n_out,
                 "total_tokens": len(words) + n_out}
        yield f"data: {json.dumps({'id': f'req-{index}', 'choices': [], 'usage': usage})}\n\n" \
            .encode()
    yield b"data: [DONE]\n\n"


def make_app(behaviour: Behaviour, received: list[dict]) -> FastAPI:
    app = FastAPI()

    async def handle(request: Request):
        body = await request.json()
        received.append({**body, "_path": request.url.path, "_time": time.perf_counter()})
        if "FAIL503" in _prompt_text(body).split():
            error = {"error": {"message": "overloaded", "type": "server_error", "code": 503}}
            return JSONResponse(error, status_code=503)
        return StreamingResponse(_stream(body, behaviour, len(received)),
                                 media_type="text/event-stream")

    app.post("/v1/completions")(handle)
    app.post("/v1/chat/completions")(handle)
    return app


class MiniOpenAIServer:
    """`with MiniOpenAIServer() as server:` serves at `server.url` until the block ends."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.received: list[dict] = []
        self._app = make_app(behaviour or Behaviour(), self.received)
        self._serving = serve(self._app, start_timeout_s=10)
        self.url = ""

    def __enter__(self) -> MiniOpenAIServer:
        self.url = self._serving.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._serving.__exit__(*exc)
