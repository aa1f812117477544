"""What the engine reports about a request after each step (docs/contracts.md, Engine API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.engine.sequence import SequenceTimes


@dataclass(frozen=True)
class RequestMetrics:
    """Seconds spent per phase of one request (monotonic clock), plus how often it was
    preempted. queue: arrival -> first scheduled; prefill: first scheduled -> first token;
    decode: first token -> finish (0 until finished)."""

    queue: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    num_preemptions: int = 0
    spec: dict[str, float] = field(default_factory=dict)
    """Speculative decoding counters of this request (workers/spec/decoder.py SpecStats);
    empty if it never verified a draft."""

    @classmethod
    def from_times(cls, times: SequenceTimes, now: float, num_preemptions: int,
                   spec: dict[str, float] | None = None) -> RequestMetrics:
        scheduled = times.first_scheduled if times.first_scheduled is not None else now
        first_token = times.first_token if times.first_token is not None else now
        finished = times.finished if times.finished is not None else first_token
        return cls(
            queue=scheduled - times.arrival,
            prefill=max(first_token - scheduled, 0.0),
            decode=max(finished - first_token, 0.0),
            num_preemptions=num_preemptions,
            spec=spec or {},
        )


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    """Tokens sampled this step (usually one; none for an abort or error output)."""
    token_ids: list[int]
    """Every token generated so far."""
    text_delta: str
    """New text since the previous output; the deltas concatenate to `text`."""
    finished: bool
    finish_reason: str | None
    """'stop' | 'length' | 'abort' | 'error' | 'prefill_done' | None."""
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (usage's cached_tokens)."""
    text: str = ""
    """The text streamed so far (the final text once finished)."""
    logprobs: list[dict[str, Any]] | None = None
    """Per new token: {'token_id', 'logprob', 'top': [[token_id, logprob], ...]}."""
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
