"""One request's state inside an engine: its tokens, how many have KV, its blocks.

The scheduler treats prefill and decode alike: a sequence has `num_tokens` tokens, of which
the first `num_computed_tokens` already have K/V in its blocks; each step computes some of
the rest, and when none are left after a step the model's last logits are sampled. A decode
step is the case "one token left"; recompute after preemption is "computed reset to 0".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from workers.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    RESERVED = "reserved"
    """Decode role: blocks reserved, waiting for the prompt's KV from a prefill worker."""
    HELD = "held"
    """Prefill role: finished, blocks kept until the KV transfer releases them."""
    FINISHED = "finished"


@dataclass
class SequenceTimes:
    """Monotonic timestamps (seconds) of a sequence's phases; None until reached."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class Sequence:
    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int
    """Order of arrival in this engine (FCFS tie-break)."""
    times: SequenceTimes
    priority: int = 0
    """Lower value runs first under the priority policy (vLLM's convention)."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    """Tokens found in the prefix cache at first admission (usage's cached_tokens)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache names of the leading full blocks, computed once (scheduler)."""
    spec_token_ids: list[int] = field(default_factory=list)
    """Speculative decoding: draft tokens proposed for this step, after the last token (a
    decode sequence verifies 1 + len(spec_token_ids) tokens); empty otherwise."""
    spec_tree: list[int] = field(default_factory=list)
    """Tree verification (workers/spec/tree.py): the parent of each draft (-1: the last
    token); empty for a chain. Read for the first len(spec_token_ids) drafts only."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_range(self, start: int, stop: int) -> list[int]:
        """Tokens at positions [start, stop) of prompt + output (+ draft tokens past them)."""
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        head = self.prompt_token_ids[start:n] if start < n else []
        tail = self.output_token_ids
        if stop > self.num_tokens:
            tail = tail + self.spec_token_ids
        return head + tail[max(start - n, 0) : stop - n]
