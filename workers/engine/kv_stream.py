"""A prefill engine's KV stream: what a streaming transport is told about each step.

A prefill-role engine with a streaming KV transport (workers/kv_transfer/torch_sender.py)
tells it each step's prompt spans before the forward pass (`KVStreamHook.before_step`) and
each layer's end during it (`layer_done`). `KVStreamCursor` remembers how far each request's
stream has got, so blocks the receiver already holds (its prefix cache) or already got are
not sent again, and cached blocks the first step skipped computing still go.
"""

from __future__ import annotations

from typing import Protocol

from workers.engine.scheduler import ScheduledBatch
from workers.kv_transfer.stream_plan import PrefillSpan


class KVStreamHook(Protocol):
    """What a streaming KV transport needs from the prefill engine's steps."""

    def before_step(self, spans: list[PrefillSpan]) -> None: ...
    def layer_done(self, local_layer: int) -> None: ...
    def fence(self) -> None: ...


class KVStreamCursor:
    def __init__(self) -> None:
        self._sent: dict[str, int] = {}
        """The prompt position each request's stream has reached."""

    def skip(self, request_id: str, num_tokens: int) -> None:
        """The receiver already holds the KV of the first `num_tokens` tokens."""
        self._sent[request_id] = num_tokens

    def forget(self, request_id: str) -> None:
        self._sent.pop(request_id, None)

    def spans(self, batch: ScheduledBatch) -> list[PrefillSpan]:
        """The prompt tokens each sequence computes this step, from where its stream stands,
        with its block table."""
        spans = []
        starts = batch.step.query_start_loc
        for i, (seq, count) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = batch.step.positions[starts[i]]
            end = min(start + count, seq.num_tokens)  # a continuation: its known output too
            sent = self._sent.get(seq.seq_id, 0)
            if sent < end:
                spans.append(PrefillSpan(seq.seq_id, sent, end, list(seq.block_table)))
                self._sent[seq.seq_id] = end
        return spans
