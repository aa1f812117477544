"""Server-sent events in OpenAI's streaming format.

A stream is a sequence of `data: <json>\\n\\n` events ending with `data: [DONE]\\n\\n`. The
payloads here are OpenAI's chunk objects: `text_completion` chunks for /v1/completions and
`chat.completion.chunk` for /v1/chat/completions. With `stream_options.include_usage` every
chunk carries `"usage": null` and one last chunk with empty `choices` carries the usage.
"""

from __future__ import annotations

import json
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
