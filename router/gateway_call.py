"""One request in flight at the gateway: what it asked for and what its chunks said so far.

RequestFlow (router/request_flow.py) makes a `Call` per admitted request and feeds it every
OutputChunk the worker streams back; the response bodies and the metrics read from it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from router.openai_protocol import usage
from workers.engine.sampling_params import SamplingParams
from workers.protocol import OutputChunk


@dataclass
class Call:
    """One request in flight at the gateway and what its chunks said so far."""

    endpoint: str
    body: Any
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    timeout_s: float
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.time)
    queue: asyncio.Queue | None = None
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    num_output: int = 0
    num_cached: int = 0
    """Prompt tokens the prefilling worker had cached (usage's cached_tokens)."""
    first_token_at: float | None = None
    final: OutputChunk | None = None
    ended: bool = False

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout_s

    @property
    def failed(self) -> bool:
        return self.final is not None and self.final.finish_reason in ("error", "abort")

    def absorb(self, chunk: OutputChunk) -> None:
        if chunk.new_token_ids and self.first_token_at is None:
            self.first_token_at = time.time()
        self.text += chunk.text_delta
        self.num_output += len(chunk.new_token_ids)
        self.num_cached = max(self.num_cached, chunk.num_cached_tokens)
        self.output_ids.extend(chunk.new_token_ids)
        self.logprobs.extend(chunk.logprobs or [])
        if chunk.finished:
            self.final = chunk

    def usage(self) -> dict[str, Any]:
        return usage(len(self.prompt_ids), self.num_output, self.num_cached)
