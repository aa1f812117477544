"""One request's output text: incremental detokenization plus what has been streamed.

The engine appends each sampled token, lets the stop checker cut the text, then takes the
delta that may be streamed now (`stop_checker.streamable_len` holds back a possible stop
string prefix). The streamed deltas always concatenate to the final text.
"""

from __future__ import annotations

from workers.config import EngineConfig
from workers.engine.sequence import Sequence
from workers.engine.stop_checker import streamable_len
from workers.errors import CheckpointFileMissing
from workers.text.tokenizer import IncrementalDetokenizer, Tokenizer


def load_tokenizer(config: EngineConfig) -> Tokenizer | None:
    """The checkpoint's tokenizer; None when there is none (e.g. a dummy config.json alone),
    in which case the engine works on token ids only."""
    try:
        return Tokenizer(config.model)
    except CheckpointFileMissing:
        return None


class RequestText:
    def __init__(self, tokenizer: Tokenizer, seq: Sequence):
        self._detokenizer = IncrementalDetokenizer(
            tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens
        )
        self._stops = seq.params.stop
        self._was_cut = False
        self.text = ""
        """Output text so far (cut before a stop string once one matched)."""
        self.sent = 0
        """Characters of `text` already handed out as deltas."""

    @property
    def sent_text(self) -> str:
        return self.text[: self.sent]

    def add(self, token_id: int) -> None:
        self.text += self._detokenizer.add([token_id])

    def cut(self, length: int) -> None:
        """Ends the text at `length` characters (right before a matched stop string)."""
        if length < len(self.text):
            self.text = self.text[:length]
            self._was_cut = True

    def mark_sent(self) -> None:
        """Counts all current text as streamed (another worker already sent it)."""
        self.sent = len(self.text)

    def take_handoff(self) -> str:
        """All text decoded so far, neither flushed nor held back for stop strings: a prefill
        worker streams exactly this before handing the request over, and the decode worker
        counts exactly this as sent (`mark_sent`). A partial UTF-8 character stays in the
        detokenizer for the decode worker to finish."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def take_delta(self, finished: bool) -> str:
        """Text that may be streamed now; everything that is left once finished."""
        if finished and not self._was_cut:
            self.text += self._detokenizer.flush()
        end = streamable_len(self.text, self._stops, finished)
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
