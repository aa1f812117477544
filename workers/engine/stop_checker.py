"""When a sequence stops, and where its text ends.

Checked after each sampled token, in vLLM's order: nothing but length stops before
`min_tokens`; then EOS (unless `ignore_eos`), `stop_token_ids`, stop strings, `max_tokens`,
and the context limit. A stop string cuts the text right before itself (not included) and
the token ids stay as sampled. While stop strings are possible, the last
`max(len(stop)) - 1` characters are held back from streaming, so the concatenated deltas
always equal the final text.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.sequence import Sequence


@dataclass(frozen=True)
class StopDecision:
    finish_reason: str | None
    """'stop' | 'length' | None (keep going)."""
    text: str
    """The output text so far, cut before a stop string if one matched."""


class StopChecker:
    def __init__(self, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def banned_token_ids(self, seq: Sequence) -> tuple[int, ...]:
        """Tokens the sampler must not draw now: every stop token until min_tokens is out."""
        if seq.num_output_tokens >= seq.params.min_tokens:
            return ()
        stops = set(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            stops |= self.eos_token_ids
        return tuple(sorted(stops))

    def check(self, seq: Sequence, text: str, previous_text_len: int) -> StopDecision:
        """`text` is the detokenized output including the newest token; the part before
        `previous_text_len` was already checked."""
        params = seq.params
        token_id = seq.output_token_ids[-1]
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                return StopDecision("stop", text)
            if token_id in params.stop_token_ids:
                return StopDecision("stop", text)
            cut = find_stop_string(text, previous_text_len, params.stop)
            if cut is not None:
                return StopDecision("stop", text[:cut])
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return StopDecision("length", text)
        return StopDecision(None, text)


def find_stop_string(text: str, previous_text_len: int, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts, searching only where new text can
    complete one; None if none does."""
    best = None
    for stop in stops:
        start = max(previous_text_len - len(stop) + 1, 0)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best):
            best = index
    return best


def streamable_len(text: str, stops: tuple[str, ...], finished: bool) -> int:
    """How much of `text` may be sent now: all of it once finished, else all but a tail
    that could still be the start of a stop string."""
    if finished or not stops:
        return len(text)
    return max(len(text) - (max(len(s) for s in stops) - 1), 0)
