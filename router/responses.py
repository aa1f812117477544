"""A request's HTTP response at the gateway: the JSON body of a finished request, the SSE
stream of one in flight, or the OpenAI-style error its final chunk (or the gateway) names.
RequestFlow (router/request_flow.py) feeds it a `Call` (router/gateway_call.py) and its
chunks; the event formats are router/sse.py's and router/openai_protocol.py's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from router import http_errors, sse
from router.drain import ShuttingDown
from router.gateway_call import Call
from router.openai_protocol import ChatCompletionRequest, logprobs_formatter, response_body
from workers.errors import (
    EmptyPrompt,
    PromptTooLong,
    RequestTimeout,
    UnknownModel,
    UnknownTokenIds,
)
from workers.protocol import OutputChunk

NextChunk = Callable[[Call], Awaitable[OutputChunk]]
End = Callable[[Call, int], None]


class Responses:
    """Renders calls of one gateway (its tokenizer, its served model names)."""

    def __init__(self, tokenizer: Any, names: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.names = names

    async def events(self, call: Call, first: OutputChunk, next_chunk: NextChunk,
                     end: End) -> AsyncIterator[bytes]:
        """The SSE body from `first` on (`next_chunk` waits for the next one). Its `finally`
        runs on completion, on error and when the client disconnects (Starlette cancels the
        stream), so `end` always runs (and aborts what is left)."""
        body = call.body
        stream = sse.StreamFormatter(
            isinstance(body, ChatCompletionRequest), call.request_id, call.created,
            self.model(call), bool(body.stream_options and body.stream_options.include_usage),
            logprobs_formatter(body, self.token_text))
        status = 499
        try:
            for payload in stream.opening():
                yield sse.event(payload)
            chunk = first
            while not call.failed:
                payload = stream.delta(chunk.text_delta, chunk.logprobs or [],
                                       chunk.finish_reason if chunk.finished else None,
                                       chunk.new_token_ids if body.return_token_ids else None)
                if payload is not None:
                    yield sse.event(payload)
                if chunk.finished:
                    status = 200
                    if stream.include_usage:
                        yield sse.event(stream.usage(call.usage()))
                    break
                chunk = await next_chunk(call)
            else:
                mapped = self.chunk_error(call, chunk)
                status = mapped.status
                yield sse.error_event(mapped.body)
            yield sse.DONE
        except (RequestTimeout, ShuttingDown) as exc:
            mapped = cut_short(exc)
            status = mapped.status
            yield sse.error_event(mapped.body)
            yield sse.DONE
        finally:
            end(call, status)

    def chunk_error(self, call: Call, chunk: OutputChunk) -> http_errors.HttpError:
        """The HTTP error a failed request's final chunk names."""
        param = chunk.error_param or param_for(chunk.error_type, call.body)
        return http_errors.from_chunk(chunk.error_type, chunk.error or chunk.finish_reason,
                                      param, call.request_id)

    def body(self, call: Call) -> dict[str, Any]:
        """The non-streaming response of a finished request."""
        assert call.final is not None
        formatter = logprobs_formatter(call.body, self.token_text)
        logprobs = formatter(call.logprobs, 0) if formatter else None
        body = response_body(call.body, call.request_id, call.created, self.model(call),
                             call.text, logprobs, call.final.finish_reason, call.usage(),
                             time.time() - call.arrival)
        if call.body.return_token_ids and body.get("choices"):
            body["choices"][0]["token_ids"] = list(call.output_ids)
        return body

    def model(self, call: Call) -> str:
        return call.body.model or self.names[0]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def cut_short(exc: RequestTimeout | ShuttingDown) -> http_errors.HttpError:
    """A request in flight ended by the gateway: its deadline (504) or a shutdown (503)."""
    if isinstance(exc, ShuttingDown):
        return exc.http_error()
    return http_errors.from_exception(exc)


def param_for(error_type: str | None, body: Any) -> str | None:
    """The request field an error (by class name) is about, where the error cannot know it."""
    if error_type == UnknownModel.__name__:
        return "model"
    if error_type in (PromptTooLong.__name__, EmptyPrompt.__name__, UnknownTokenIds.__name__):
        return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    return None
