"""Continuous-batching scheduler: which sequences run this step, and how many tokens each.

Pure bookkeeping (no torch): it owns the waiting and running queues and a `BlockPool`, and
builds the `StepInput` the runner executes. One step, in order:
1. running decodes (one token each), then running partial prefills (next chunk);
2. if nothing was preempted, waiting sequences are admitted while token budget, sequence
   slots and blocks last (chunked: a long prompt is split across steps).
When a running sequence needs a block and none is free, the lowest-ranked running sequence
not yet scheduled this step is preempted by recompute (blocks freed, back to the front of
the waiting queue, its prompt + output prefilled again later); with none left the sequence
preempts itself. Rank: arrival order (fcfs) or (priority, arrival) (priority).

Prefix caching (the pool's `PrefixCache`, workers/engine/prefix_cache.py): a sequence
admitted without blocks first shares the leading full blocks already cached (always leaving
at least one token to compute, whose logits it samples), so it starts with those tokens
computed; after every step the blocks a sequence filled are named in the cache.
Speculative decoding: a decode sequence with draft tokens (`spec_token_ids`, set by the
engine's proposer before `schedule`) runs 1 + k tokens and returns logits for all of them;
`postprocess` takes the tokens its verification kept and rolls back the rejected slots.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Set
from dataclasses import dataclass

from workers.config import SchedulerConfig
from workers.engine.block_pool import BlockPool
from workers.engine.prefix_cache import block_hashes
from workers.engine.sequence import Sequence, SequenceStatus
from workers.engine.step_input import StepInput
from workers.spec.tree import ancestor_masks, tree_positions


@dataclass(frozen=True)
class ScheduledBatch:
    """What one step runs: the runner's input plus the sequences behind it."""

    step: StepInput
    seqs: list[Sequence]
    num_new_tokens: list[int]
    sampled: list[Sequence]
    """Sequences whose logits come back this step, in `step.logits_indices` order."""
    preempted: list[Sequence]

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Owns the queues; the engine adds, aborts and finishes sequences through it."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def _rank(self, seq: Sequence) -> tuple[int, int]:
        priority = seq.priority if self.config.policy == "priority" else 0
        return (priority, seq.arrival_index)

    def add(self, seq: Sequence) -> None:
        """Queues a new (or preempted) sequence in rank order."""
        seq.status = SequenceStatus.WAITING
        if self.config.policy == "fcfs":
            self.waiting.append(seq)
            return
        keys = [self._rank(s) for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, self._rank(seq)), seq)

    def join_running(self, seq: Sequence) -> None:
        """Adds a sequence whose KV is already in its blocks (decode role, after commit)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of either queue (finish or abort); blocks are the caller's."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self, in_flight: Set[str] = frozenset(),
                 num_microbatches: int = 1) -> ScheduledBatch:
        """The next batch. Pipeline micro-batches (workers/engine/micro_batches.py): the
        sequences named in `in_flight` are in a batch whose tokens are not back yet, so they
        are neither scheduled nor preempted; and one batch takes at most
        ceil(running / num_microbatches) running sequences, so that batches in flight share
        the work about evenly."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        share = -(-len(self.running) // num_microbatches)
        order = sorted(self.running, key=self._rank)
        decodes = [s for s in order if s.num_uncomputed_tokens == 1]
        prefills = [s for s in order if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if seq in preempted or budget == 0 or seq.seq_id in in_flight:
                continue
            if len(scheduled) == share:
                break
            num_new = self._chunk(seq, budget)
            if not self._make_room(seq, num_new, scheduled, preempted, in_flight):
                continue
            scheduled.append((seq, num_new))
            budget -= num_new
        if not preempted:
            budget = self._admit(budget, scheduled)
        self.running.sort(key=self._rank)
        return self._build(scheduled, preempted)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        if seq.spec_token_ids:  # drafts past the budget are dropped, not chunked
            num_new = min(1 + len(seq.spec_token_ids), budget)
            del seq.spec_token_ids[max(num_new - 1, 0):]
            return num_new
        num_new = min(seq.num_uncomputed_tokens, budget)
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0 and num_new > 1:
            num_new = min(num_new, threshold)
        return num_new

    def _make_room(
        self,
        seq: Sequence,
        num_new: int,
        scheduled: list[tuple[Sequence, int]],
        preempted: list[Sequence],
        in_flight: Set[str],
    ) -> bool:
        """Grows seq's table by preempting lower-ranked unscheduled sequences (never one in
        flight); False if seq itself had to be preempted."""
        target = seq.num_computed_tokens + num_new
        while not self.pool.can_append_slots(seq.block_table, target):
            busy = {id(s) for s, _ in scheduled}
            candidates = [s for s in self.running if s is not seq and id(s) not in busy
                          and s.seq_id not in in_flight]
            victim = max(candidates, key=self._rank, default=None)
            if victim is None or self._rank(victim) < self._rank(seq):
                victim = seq
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.pool.append_slots(seq.block_table, target)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.spec_token_ids.clear()
        self.pool.release(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        if self.config.policy == "fcfs":
            self.waiting.appendleft(seq)
        else:
            self.add(seq)

    def _admit(self, budget: int, scheduled: list[tuple[Sequence, int]]) -> int:
        """Moves waiting sequences to running, head first, while everything they need lasts."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self.share_cached_prefix(seq)
            num_new = self._chunk(seq, budget)
            target = seq.num_computed_tokens + num_new
            if (num_new < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill
                    or not self.pool.can_append_slots(seq.block_table, target)):
                self._unshare(seq)
                break
            self.pool.append_slots(seq.block_table, target)
            self._count_lookup(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        return budget

    def _build(
        self, scheduled: list[tuple[Sequence, int]], preempted: list[Sequence]
    ) -> ScheduledBatch:
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        sampled: list[Sequence] = []
        tree_masks: list[int] = []
        block_size = self.pool.block_size
        for seq, num_new in scheduled:
            start = seq.num_computed_tokens
            stop = start + num_new
            token_ids += seq.token_range(start, stop)
            tree = seq.spec_tree[: len(seq.spec_token_ids)]
            positions += tree_positions(start, tree) if tree else range(start, stop)
            if tree or tree_masks:
                tree_masks = tree_masks or [0] * (len(token_ids) - num_new)
                tree_masks += ancestor_masks(tree) if tree else [0] * num_new
            slot_mapping += [
                seq.block_table[p // block_size] * block_size + p % block_size
                for p in range(start, stop)
            ]
            query_start_loc.append(len(token_ids))
            seq_lens.append(stop)
            if stop == seq.num_tokens + len(seq.spec_token_ids):
                # A verification run needs the logits of every token; a decode or the end
                # of a prompt those of its last.
                logits_indices += range(len(token_ids) - 1 - len(seq.spec_token_ids),
                                        len(token_ids))
                sampled.append(seq)
        step = StepInput(
            seq_ids=[seq.seq_id for seq, _ in scheduled],
            token_ids=token_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=[list(seq.block_table) for seq, _ in scheduled],
            logits_indices=logits_indices,
            tree_masks=tree_masks or None,
        )
        return ScheduledBatch(
            step=step,
            seqs=[seq for seq, _ in scheduled],
            num_new_tokens=[n for _, n in scheduled],
            sampled=sampled,
            preempted=preempted,
        )

    def postprocess(
        self, batch: ScheduledBatch, sampled_token_ids: list[int] | list[list[int]]
    ) -> None:
        """Records the step: computed counts advance, each sampled sequence gets its token
        (a verification run: the list of its accepted drafts plus one token; the rejected
        drafts' KV slots no longer count as computed and their spare blocks are freed).

        Finishing (stop checks need text) is the engine's job, through `remove`.
        """
        starts = {}
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            starts[seq.seq_id] = seq.num_computed_tokens
            seq.num_computed_tokens += num_new
        for seq, new in zip(batch.sampled, sampled_token_ids, strict=True):
            tokens = new if isinstance(new, list) else [new]
            seq.output_token_ids += tokens
            if seq.spec_token_ids:
                seq.num_computed_tokens -= len(seq.spec_token_ids) + 1 - len(tokens)
                seq.spec_token_ids = []
                self.pool.rollback_slots(seq.block_table, seq.num_tokens)
        # After verification: only accepted tokens name blocks, never rejected drafts.
        for seq in batch.seqs:
            self.cache_computed_blocks(seq, starts[seq.seq_id], seq.num_computed_tokens)

    # ---- prefix caching --------------------------------------------------------------------

    def share_cached_prefix(self, seq: Sequence) -> int:
        """A sequence without blocks takes the cached blocks of its longest cached prefix
        (full blocks, at least one token left uncomputed) and counts them computed. Returns
        how many tokens that is (0 without a cache)."""
        cache = self.pool.prefix_cache
        if cache is None or seq.block_table:
            return 0
        block_size = self.pool.block_size
        limit = (seq.num_tokens - 1) // block_size
        found = cache.match(self._hashes(seq, limit))
        self.pool.share(found)
        seq.block_table.extend(found)
        seq.num_computed_tokens = len(found) * block_size
        return seq.num_computed_tokens

    def _unshare(self, seq: Sequence) -> None:
        """Undoes `share_cached_prefix` for a sequence that stays waiting."""
        self.pool.release(seq.block_table)
        seq.num_computed_tokens = 0

    def _count_lookup(self, seq: Sequence, computes_prefill: bool = True) -> None:
        """Counts a lookup's tokens queried and hit; a sequence's first lookup where its
        prefill is computed is its usage's cached_tokens."""
        cache = self.pool.prefix_cache
        if cache is None:
            return
        cache.count_lookup(seq.num_tokens, seq.num_computed_tokens)
        if seq.num_preemptions == 0 and computes_prefill:
            seq.num_cached_tokens = seq.num_computed_tokens

    def count_reserved_lookup(self, seq: Sequence) -> None:
        """Decode role: a reservation's cached prefix counts as a lookup (its prefill, and
        so its cached_tokens, are the prefill worker's)."""
        self._count_lookup(seq, computes_prefill=False)

    def cache_computed_blocks(self, seq: Sequence, start: int, end: int) -> None:
        """Names in the cache the blocks that tokens [start, end), now computed, filled.

        Only known tokens count (end is cut at `num_tokens`): KV written at positions past
        them (speculative drafts, verified or rolled back later) never gets a name here."""
        cache = self.pool.prefix_cache
        block_size = self.pool.block_size
        first, last = start // block_size, min(end, seq.num_tokens) // block_size
        if cache is None or first >= last:
            return
        hashes = self._hashes(seq, last)
        for i in range(first, last):
            cache.register(seq.block_table[i], hashes[i])

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Names of seq's first `num_blocks` full blocks (computed once per sequence)."""
        known = seq.block_hashes
        if len(known) < num_blocks:
            block_size = self.pool.block_size
            start = len(known) * block_size
            known += block_hashes(self.pool.prefix_cache.root,
                                  seq.token_range(start, num_blocks * block_size), block_size,
                                  parent=known[-1] if known else None)
        return known[:num_blocks]
