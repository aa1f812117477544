"""`MicroBatches`: pipeline parallelism that keeps every stage busy.

With pp_size stages, one batch stepping through the stages leaves all but one stage idle.
Instead the engine keeps up to pp_size batches ("micro-batches", over disjoint sequences) in
flight, as vLLM's virtual engines and SGLang's pipeline event loop do: the driver schedules
micro-batch n + 1 and runs it through stage 0 while stage 1 still works on micro-batch n.
A sequence in flight is neither scheduled again nor preempted until its tokens are back (its
next token is not known before); the scheduler gives each micro-batch an even share of the
running sequences (`Scheduler.schedule(in_flight, num_microbatches)`).

Why not split each step into M micro-batches inside the step instead: the driver samples
only once all of a step's micro-batches are back, so every step pays the pipeline's fill and
drain, a throughput of P*M / (M + P - 1) of one device: 1.33x at P = 2, M = 2, and 1.8x only
from M = 9, where each micro-batch is too small to use a GPU well. Batches in flight across
steps have no fill or drain in steady state: at P = 2 each stage holds one half of the
running sequences while the other stage holds the other half. It needs no knob: the depth is
pp_size.

Correctness rests on order: every stage takes the steps in the order the driver submitted
them, so a later micro-batch sees every KV slot an earlier one wrote. A sequence aborted in
flight keeps its blocks until its batch is collected (`release_blocks`): a later step would
write after it anyway, but a KV transfer into blocks reserved meanwhile (decode role) is not
ordered after the stages' writes. The collected batch leaves out the sequences that finished
meanwhile, with their logits rows.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable

import torch

from workers.device_copy import device_tensor
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import Sequence, SequenceStatus
from workers.engine.stage_driver import StageDriver


class MicroBatches:
    """The engine's pipelined step (pp_size > 1, no speculative decoding, no per-layer KV
    stream). `on_scheduled(batch)` runs for each batch as it is submitted."""

    def __init__(self, scheduler: Scheduler, driver: StageDriver,
                 on_scheduled: Callable[[ScheduledBatch], None]):
        self.scheduler = scheduler
        self.driver = driver
        self.on_scheduled = on_scheduled
        self._in_flight: deque[ScheduledBatch] = deque()
        self._released: dict[str, list[int]] = {}
        """Blocks of sequences finished in flight, freed when their batch is collected."""
        self.in_flight_ids: set[str] = set()
        """Ids of the sequences in a submitted batch whose logits are not collected."""

    @property
    def busy(self) -> bool:
        """Batches are in flight: the engine must step until they are collected."""
        return bool(self._in_flight)

    def advance(self) -> tuple[ScheduledBatch, torch.Tensor] | None:
        """Schedules the next micro-batch over the sequences not in flight and submits it;
        once `pipeline_depth` batches are in flight, or nothing new could be scheduled,
        collects the oldest. Returns it (its sequences still running only) with their
        logits rows, or None while the pipeline fills."""
        depth = self.driver.pipeline_depth
        batch = self.scheduler.schedule(self.in_flight_ids, depth)
        if not batch.is_empty:
            self.driver.submit(batch.step)
            self._in_flight.append(batch)
            self.in_flight_ids.update(seq.seq_id for seq in batch.seqs)
            self.on_scheduled(batch)
        if not self._in_flight or (not batch.is_empty and len(self._in_flight) < depth):
            return None
        done = self._in_flight.popleft()
        logits = self.driver.collect()
        for seq in done.seqs:
            self.in_flight_ids.discard(seq.seq_id)
            self.scheduler.pool.release(self._released.pop(seq.seq_id, []))
        return still_running(done, logits)

    def release_blocks(self, seq: Sequence) -> None:
        """Frees a finished sequence's blocks: now, or once its batch is collected if it is
        in flight (see the module doc)."""
        if seq.seq_id not in self.in_flight_ids:
            self.scheduler.pool.release(seq.block_table)
            return
        self._released[seq.seq_id] = list(seq.block_table)
        seq.block_table.clear()


def still_running(batch: ScheduledBatch, logits: torch.Tensor
                  ) -> tuple[ScheduledBatch, torch.Tensor]:
    """`batch` without its sequences that finished while it was in flight, and the logits
    rows of the sampled ones left (one row per sampled sequence: no speculative rows)."""
    if all(seq.status is SequenceStatus.RUNNING for seq in batch.seqs):
        return batch, logits
    kept = [(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
            if seq.status is SequenceStatus.RUNNING]
    rows = [i for i, seq in enumerate(batch.sampled) if seq.status is SequenceStatus.RUNNING]
    live = dataclasses.replace(
        batch, seqs=[seq for seq, _ in kept], num_new_tokens=[n for _, n in kept],
        sampled=[batch.sampled[i] for i in rows])
    return live, logits[device_tensor(rows, torch.long, logits.device)]
