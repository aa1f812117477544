"""Server-sent events in OpenAI's streaming format.

A stream is a sequence of `data: <json>\\n\\n` events ending with `data: [DONE]\\n\\n`. The
payloads here are OpenAI's chunk objects: `text_completion` chunks for /v1/completions and
`chat.completion.chunk` for /v1/chat/completions. With `stream_options.include_usage` every
chunk carries `"usage": null` and one last chunk with empty `choices` carries the usage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One SSE event holding `payload` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    text: str,
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """A /v1/completions stream chunk with one choice."""
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _chunk(request_id, "text_completion", created, model, [choice])


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """A /v1/chat/completions stream chunk; the first delta carries `role`, later ones
    `content`."""
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _chunk(request_id, "chat.completion.chunk", created, model, [choice])


def usage_chunk(
    request_id: str, obj: str, created: int, model: str, usage: dict[str, int]
) -> dict[str, Any]:
    """The last chunk under `include_usage`: no choices, only the usage."""
    chunk = _chunk(request_id, obj, created, model, [])
    chunk["usage"] = usage
    return chunk


def error_event(error_body: dict[str, Any]) -> bytes:
    """An error in mid-stream: the HTTP status is already 200, so the OpenAI error object is
    sent as an event (what OpenAI and vLLM clients look for) before `[DONE]`."""
    return event(error_body)


def _chunk(
    request_id: str, obj: str, created: int, model: str, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": created, "model": model,
            "choices": choices}


class StreamFormatter:
    """Builds one request's stream chunks: the same id, `created` and model on each, the
    right chunk object for the endpoint, logprobs in that endpoint's format, and
    `"usage": null` on every chunk when the client asked for a final usage chunk.

    `logprobs` is the per-token formatter of the endpoint (None: the client did not ask);
    it takes the workers' entries and the text offset of the first of them.
    """

    def __init__(self, chat: bool, request_id: str, created: int, model: str,
                 include_usage: bool,
                 logprobs: Callable[[list[dict[str, Any]], int], dict[str, Any]] | None):
        self.chat = chat
        self.request_id = request_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.streamed = 0
        """Characters of text sent so far (the offset of the next logprobs entry)."""

    def opening(self) -> list[dict[str, Any]]:
        """Chunks before the first token: chat announces the assistant role."""
        return [self._chunk({"role": "assistant", "content": ""})] if self.chat else []

    def delta(self, text: str, entries: list[dict[str, Any]], finish_reason: str | None,
              token_ids: list[int] | None = None) -> dict[str, Any] | None:
        """The chunk for new text (and its tokens' logprobs, and with `return_token_ids`
        their ids); None when there is nothing."""
        if not text and not entries and finish_reason is None and not token_ids:
            return None
        logprobs = self.logprobs(entries, self.streamed) if self.logprobs else None
        self.streamed += len(text)
        content = ({"content": text} if text else {}) if self.chat else text
        payload = self._chunk(content, logprobs, finish_reason)
        if token_ids is not None:
            payload["choices"][0]["token_ids"] = list(token_ids)
        return payload

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return usage_chunk(self.request_id, obj, self.created, self.model, usage)

    def _chunk(self, content: Any, logprobs: dict[str, Any] | None = None,
               finish_reason: str | None = None) -> dict[str, Any]:
        build = chat_chunk if self.chat else completion_chunk
        payload = build(self.request_id, self.created, self.model, content, logprobs,
                        finish_reason)
        if self.include_usage:
            payload["usage"] = None  # OpenAI: null on every chunk but the last
        return payload
