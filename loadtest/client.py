"""Sends one streaming request to an OpenAI-compatible server and times it (one RequestRecord).

The request asks for `stream_options.include_usage`, so servers that support it report the
true prompt/completion token counts in a final chunk; without it, the output count is the
number of text-carrying chunks and the prompt count the workload's estimate. A token-id
prompt's length is known exactly and is used as it is.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from loadtest.record import RequestRecord
from loadtest.workload import RequestSpec

EndpointKind = Literal["completions", "chat"]
_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class EndpointConfig:
    url: str
    """Server base URL (http://host:port) or the full endpoint URL."""
    model: str
    endpoint: EndpointKind = "completions"
    timeout_s: float = 120.0
    """Per-request limit, send -> end of stream."""
    ignore_eos: bool = False
    """Also send `ignore_eos` and `min_tokens = max_tokens` (vLLM/SGLang/kvrelay extensions)."""
    temperature: float = 0.0
    api_key: str | None = None

    @property
    def request_url(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith(_PATHS[self.endpoint]) else base + _PATHS[self.endpoint]


def build_body(config: EndpointConfig, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": spec.max_tokens,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        prompt = spec.prompt
        body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) \
            else prompt
    else:
        body["prompt"] = spec.prompt
        if isinstance(spec.prompt, list):
            # A server whose model has no tokenizer streams no text: ask for the ids
            # (vLLM's `return_token_ids`), so each token is still a timed chunk.
            body["return_token_ids"] = True
    if config.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = spec.max_tokens
    return body


@dataclass
class _Timeline:
    """Mutable state while one stream is read; frozen into a RequestRecord at the end."""

    sent_at: float
    token_times: list[float] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    done: bool = False
    error: str | None = None
    error_detail: str = ""
    http_status: int | None = None

    def fail(self, kind: str, detail: str) -> None:
        if self.error is None:
            self.error, self.error_detail = kind, detail[:500]

    def on_chunk(self, chunk: dict[str, Any], now: float) -> None:
        if "error" in chunk:
            self.fail("stream_error", json.dumps(chunk["error"])[:500])
            return
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = choice.get("text") or delta.get("content") or delta.get("reasoning_content")
            if text or choice.get("token_ids"):  # token ids: a model without a tokenizer
                self.token_times.append(now)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]


async def _read_stream(client: httpx.AsyncClient, config: EndpointConfig,
                       body: dict[str, Any], line: _Timeline) -> None:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with client.stream("POST", config.request_url, json=body, headers=headers) as resp:
        line.http_status = resp.status_code
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")
            line.fail(f"http_{resp.status_code}", detail)
            return
        async for raw in resp.aiter_lines():
            if not raw.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = raw[5:].strip()
            if data == "[DONE]":
                line.done = True
                return
            try:
                line.on_chunk(json.loads(data), time.perf_counter())
            except json.JSONDecodeError:
                line.fail("broken_stream", f"chunk is not JSON: {data[:200]}")
                return
            if line.error:
                return


async def send_request(client: httpx.AsyncClient, config: EndpointConfig, spec: RequestSpec,
                       run_start: float, sent_at: float | None = None) -> RequestRecord:
    """Send `spec`, read its SSE stream to the end; never raises for server misbehaviour.
    `sent_at` (perf_counter): the instant the run decided to send it, else now."""
    line = _Timeline(sent_at=time.perf_counter() if sent_at is None else sent_at)
    try:
        await asyncio.wait_for(_read_stream(client, config, build_body(config, spec), line),
                               config.timeout_s)
    except asyncio.TimeoutError:
        line.fail("timeout", f"no end of stream after {config.timeout_s:g} s")
    except asyncio.CancelledError:
        # The run's global timeout cancelled this request: report it rather than lose it.
        line.fail("cancelled", "stopped by the run's global timeout")
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        line.fail("connect_error", f"{type(exc).__name__}: {exc}")
    except httpx.HTTPError as exc:
        line.fail("broken_stream", f"{type(exc).__name__}: {exc}")
    if line.error is None and not (line.done or line.finish_reason):
        line.fail("broken_stream", "stream ended without [DONE] or a finish_reason")
    return _freeze(spec, line, time.perf_counter(), run_start)


def _freeze(spec: RequestSpec, line: _Timeline, ended_at: float,
            run_start: float) -> RequestRecord:
    times = line.token_times
    usage_in, usage_out = line.usage.get("prompt_tokens"), line.usage.get("completion_tokens")
    prompt_tokens, prompt_source = (
        (spec.prompt_tokens, "exact") if spec.prompt_tokens_exact
        else (int(usage_in), "usage") if usage_in is not None
        else (spec.prompt_tokens, "estimate"))
    return RequestRecord(
        index=spec.index,
        start_time=line.sent_at - run_start,
        prompt_tokens=prompt_tokens,
        prompt_tokens_source=prompt_source,
        output_tokens=int(usage_out) if usage_out is not None else len(times),
        output_tokens_source="usage" if usage_out is not None else "chunks",
        max_tokens=spec.max_tokens,
        cached_tokens=(line.usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        ttft=times[0] - line.sent_at if times else None,
        itl=[b - a for a, b in zip(times, times[1:], strict=False)],
        e2e=ended_at - line.sent_at,
        finish_reason=line.finish_reason,
        error=line.error,
        error_detail=line.error_detail,
        http_status=line.http_status,
    )
