"""`RequestTable`: an engine's live requests by id.

Each request is a Sequence and, with a tokenizer, its RequestText (the text streamed so far).
A request is checked into a Sequence (`new`: typed errors, nothing changes), then admitted
(`admit`); it leaves once it finished with its blocks freed (`finish`), while a HELD one
(blocks a KV transfer still reads) stays until it is released.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq

from workers.engine.request_check import RequestCheck
from workers.engine.sampling_params import SamplingParams
from workers.engine.sampling_rows import SamplingRows
from workers.engine.sequence import Sequence, SequenceStatus, SequenceTimes
from workers.errors import DuplicateRequest, UnknownRequest
from workers.text.request_text import RequestText
from workers.text.tokenizer import Tokenizer


class RequestTable:
    """The sequences and texts of one engine's requests; `rows` (the sampler's per-request
    state) follows each request in and out."""

    def __init__(self, check: RequestCheck, tokenizer: Tokenizer | None, rows: SamplingRows):
        self.check = check
        self.tokenizer = tokenizer
        self.rows = rows
        self._seqs: dict[str, Sequence] = {}
        self._texts: dict[str, RequestText] = {}
        self._arrivals = itertools.count()

    def new(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        priority: int, output_token_ids: Seq[int] = (),
    ) -> Sequence:
        """Validates a request (raising typed errors, changing nothing) into a Sequence."""
        if request_id in self._seqs:
            raise DuplicateRequest(request_id)
        self.check(prompt_token_ids, params, priority, output_token_ids)
        return Sequence(
            seq_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            arrival_index=next(self._arrivals),
            times=SequenceTimes(arrival=time.monotonic()),
            priority=priority,
            output_token_ids=list(output_token_ids),
        )

    def admit(self, seq: Sequence, sent_text_len: int = 0) -> None:
        """Enters `seq`; a continuation's known output counts as text already produced, its
        first `sent_text_len` characters as sent."""
        self._seqs[seq.seq_id] = seq
        if self.tokenizer is not None:
            text = self._texts[seq.seq_id] = RequestText(self.tokenizer, seq)
            for token_id in seq.output_token_ids:  # a continuation: the text so far
                text.add(token_id)
            text.sent = min(sent_text_len, len(text.text))
        self.rows.admit(seq)

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    def in_status(self, request_id: str, status: SequenceStatus) -> Sequence:
        """The sequence of `request_id`, which must be in `status` (UnknownRequest if not)."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not status:
            raise UnknownRequest(request_id)
        return seq

    def text(self, request_id: str) -> RequestText | None:
        """The request's text (None without a tokenizer, or once it finished)."""
        return self._texts.get(request_id)

    def finish(self, seq_id: str, held: bool) -> None:
        """The request finished: its text and sampling state go; the sequence too unless its
        blocks are `held`."""
        self._texts.pop(seq_id, None)
        self.rows.forget(seq_id)
        if not held:
            self._seqs.pop(seq_id, None)
