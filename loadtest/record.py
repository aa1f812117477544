"""One request's measured timeline: what the client saw, in seconds since the run started.

Definitions (as `vllm bench serve`):
- TTFT: send -> first chunk that carries output text.
- ITL: every gap between consecutive text-carrying chunks (a chunk may hold several tokens).
- E2E: send -> end of stream.
- TPOT: (E2E - TTFT) / (output_tokens - 1); undefined (None) for one output token, because
  such a request has no decode phase.
Failed requests keep what was measured before the failure, but never enter latency statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

TokenSource = Literal["usage", "estimate", "exact", "chunks"]
"""Where a token count came from: the server's usage, our estimate of a text prompt, the
exact length of a token-id prompt, or counted output chunks."""

ERROR_KINDS = (
    "connect_error",  # no HTTP response at all
    "timeout",  # the per-request --timeout ran out
    "broken_stream",  # connection dropped or stream ended without [DONE] / finish_reason
    "stream_error",  # the server sent an error object inside the SSE stream
    "cancelled",  # the run's global timeout stopped it
)
"""Plus `http_<status>` for any non-200 response."""


@dataclass(frozen=True)
class RequestRecord:
    index: int
    start_time: float
    """Seconds from run start to the moment the request was sent."""
    prompt_tokens: int
    prompt_tokens_source: TokenSource
    output_tokens: int
    output_tokens_source: TokenSource
    max_tokens: int
    cached_tokens: int | None = None
    """Prompt tokens the server served from its prefix cache
    (usage.prompt_tokens_details.cached_tokens); None where it does not say."""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    """None on success; else one of ERROR_KINDS or `http_<status>`."""
    error_detail: str = ""
    http_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok, "tpot": self.tpot}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
