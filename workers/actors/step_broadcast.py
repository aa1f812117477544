"""`StepBroadcast`: the driver rank hands each step's inputs to the other ranks of its group.

One broadcast per step over the group's CPU (gloo) backend, not a Ray call per rank per step:
the StepInput's integers travel as one int64 tensor behind a fixed-size header (so a
receiver knows the payload's length). Sequence ids stay on the driver (the model never
reads them); the other ranks get placeholders. A header with op STOP ends the followers'
loops. Either role may carry a side payload (`side`, a list of byte strings: the KV transfer
commands the other ranks must run in order with the steps, workers/kv_transfer/rank_*.py):
with a step, the ranks handle it before running the step; alone (op KV), between steps.
The driver does not wait for the other ranks to take what it sends (pipeline stages still
busy with earlier micro-batches take it later).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import msgpack
import torch
import torch.distributed as dist

from workers.engine.step_input import StepInput

OP_STEP = 1
OP_STOP = 2
OP_KV = 3
_HEADER = 6
"""op, num_tokens, num_seqs, num_logits, total block-table entries, side payload bytes."""


def encode_step(step: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) int64 tensors of one step."""
    table_lens = [len(table) for table in step.block_tables]
    payload = [
        *step.token_ids, *step.positions, *step.slot_mapping, *step.query_start_loc,
        *step.seq_lens, *step.logits_indices, *table_lens,
    ]
    for table in step.block_tables:
        payload += table
    header = [OP_STEP, step.num_tokens, step.num_seqs, len(step.logits_indices),
              sum(table_lens), 0]
    return torch.tensor(header, dtype=torch.int64), torch.tensor(payload, dtype=torch.int64)


def payload_size(header: list[int]) -> int:
    _, tokens, seqs, logits, tables = header[:5]
    return 3 * tokens + (seqs + 1) + seqs + logits + seqs + tables


def decode_step(header: list[int], payload: torch.Tensor) -> StepInput:
    """The StepInput `encode_step` packed (seq ids are '0', '1', ...)."""
    _, tokens, seqs, logits, _ = header[:5]
    values = payload.tolist()
    sizes = [tokens, tokens, tokens, seqs + 1, seqs, logits, seqs]
    fields, at = [], 0
    for size in sizes:
        fields.append(values[at:at + size])
        at += size
    ids, positions, slots, starts, seq_lens, logits_indices, table_lens = fields
    tables = []
    for length in table_lens:
        tables.append(values[at:at + length])
        at += length
    return StepInput(
        seq_ids=[str(i) for i in range(seqs)], token_ids=ids, positions=positions,
        slot_mapping=slots, query_start_loc=starts, seq_lens=seq_lens, block_tables=tables,
        logits_indices=logits_indices,
    )


class StepBroadcast:
    """Rank `src` calls `send(step)` (or `post(side)`, `stop()`); every other rank of `group`
    calls `recv()` in the same order, which hands side payloads to `on_side`. `group`: a
    process group whose backend takes CPU tensors (gloo); None is the default group."""

    def __init__(self, group=None, src: int = 0,
                 on_side: Callable[[list[bytes]], None] | None = None):
        self.group = group
        self.src = src
        self.on_side = on_side
        self._pending: list = []
        """The driver's broadcasts not yet taken by every rank (with their tensors)."""

    def send(self, step: StepInput, side: list[bytes] | None = None) -> None:
        """Returns without waiting for the other ranks to take the step: with pipeline
        micro-batches in flight the last stage is still busy with earlier ones, and the
        driver must go on running its own stage meanwhile."""
        header, payload = encode_step(step)
        packed = msgpack.packb(side) if side else b""
        header[5] = len(packed)
        self._broadcast(header)
        self._broadcast(payload)
        self._send_side(packed)

    def post(self, side: list[bytes]) -> None:
        """The side payload alone, between steps."""
        packed = msgpack.packb(side)
        self._broadcast(torch.tensor([OP_KV, 0, 0, 0, 0, len(packed)], dtype=torch.int64))
        self._send_side(packed)

    def _send_side(self, packed: bytes) -> None:
        if packed:
            self._broadcast(torch.frombuffer(bytearray(packed), dtype=torch.uint8))

    def _broadcast(self, tensor: torch.Tensor) -> None:
        """Starts the broadcast and keeps it (with its tensor) until every rank took it."""
        self._pending = [(work, kept) for work, kept in self._pending
                         if not work.is_completed()]
        work = dist.broadcast(tensor, self.src, group=self.group, async_op=True)
        self._pending.append((work, tensor))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ends the other ranks' loops; waits at most `timeout_s` for them to take it (a rank
        stuck in a step never will: the caller kills it)."""
        stop = torch.tensor([OP_STOP, 0, 0, 0, 0, 0], dtype=torch.int64)
        work = dist.broadcast(stop, self.src, group=self.group, async_op=True)
        work.wait(datetime.timedelta(seconds=timeout_s))

    def recv(self) -> StepInput | None:
        """The next step, or None once the driver stopped the group."""
        while True:
            header = torch.empty(_HEADER, dtype=torch.int64)
            dist.broadcast(header, self.src, group=self.group)
            values = header.tolist()
            if values[0] == OP_STOP:
                return None
            if values[0] == OP_KV:
                self._recv_side(values[5])
                continue
            payload = torch.empty(payload_size(values), dtype=torch.int64)
            dist.broadcast(payload, self.src, group=self.group)
            self._recv_side(values[5])
            return decode_step(values, payload)

    def _recv_side(self, size: int) -> None:
        if not size:
            return
        buf = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(buf, self.src, group=self.group)
        if self.on_side is not None:
            self.on_side(msgpack.unpackb(buf.numpy().tobytes()))
