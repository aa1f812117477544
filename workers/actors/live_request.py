"""One request's output stream at the worker that streams it: where the stream is (the next
token index, continuing from `resume_index` after a migration) and the chunks it sends.

`LiveRequest.chunk` numbers each chunk's tokens by their position in the whole output, so the
gateway can order chunks written by several workers (router/output_receiver.py); `last_index`
says how far this worker itself streamed (the router's final chunk goes out behind it,
router/final_chunk.py). `error_chunk` is the one final chunk of a request that failed here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from workers.errors import KvrelayError
from workers.protocol import GenerateRequest, OutputChunk


@dataclass
class LiveRequest:
    """A request this worker currently owns the output stream of."""

    request: GenerateRequest
    submitted: float = field(default_factory=time.time)
    first_token_at: float | None = None
    num_output_tokens: int = field(init=False)
    """Output tokens the client has (or will have) so far; starts at the request's
    resume_index."""
    timings: dict[str, float] = field(default_factory=dict)
    last_index: int = -1
    """Index of the last output token this worker streamed itself; -1: none yet."""

    def __post_init__(self) -> None:
        self.num_output_tokens = self.request.resume_index

    def chunk(self, output: Any, done: bool, worker_id: str, now: float) -> OutputChunk:
        """The chunk carrying `output`'s new tokens (a RequestOutput), which the stream
        advances past."""
        new = list(output.new_token_ids)
        if new and self.first_token_at is None:
            self.first_token_at = now
        index = self.num_output_tokens
        self.num_output_tokens += len(new)
        if new:
            self.last_index = self.num_output_tokens - 1
        return OutputChunk(
            request_id=self.request.request_id,
            new_token_ids=new,
            text_delta=output.text_delta or "",
            finished=done,
            finish_reason=output.finish_reason if done else None,
            logprobs=output.logprobs,
            num_prompt_tokens=output.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            num_cached_tokens=output.num_cached_tokens,
            index=index if new else None,
            worker_id=worker_id,
            attempt=self.request.attempt,
        )


def error_chunk(request: GenerateRequest, exc: KvrelayError, worker_id: str) -> OutputChunk:
    """The final chunk of `request` that failed with `exc` on `worker_id`."""
    return OutputChunk(
        request_id=request.request_id,
        finished=True,
        finish_reason="error",
        error=str(exc),
        error_type=type(exc).__name__,
        error_param=getattr(exc, "field", None),
        num_prompt_tokens=len(request.prompt_token_ids),
        worker_id=worker_id,
        attempt=request.attempt,
    )
