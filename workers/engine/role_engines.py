"""The disaggregated roles' engines (EngineConfig.role): `PrefillEngine` and `DecodeEngine`.

Each is an LLMEngine (workers/engine/engine.py) plus its role's side of a KV transfer, the
hooks of the "Engine API" (docs/contracts.md) that the prefill and decode worker actors
call. `build_engine` builds the engine of a config's role (an LLMEngine when colocated).

- Prefill role: a request ends after its first token with finish_reason 'prefill_done' and
  its blocks are held (`held_block_ids`) until `release` (LLMEngine's finish rule, by
  `config.role`). With a streaming KV transport
  (`attach_kv_stream`) each step's KV goes out layer by layer while the step runs.
- Decode role: `reserve_remote` allocates blocks before the prefill starts (the prefill
  worker writes the prompt's KV there) and `commit_remote` joins the sequence to the
  running batch once that KV has landed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

import torch

from workers.config import EngineConfig
from workers.engine.block_pool import blocks_for
from workers.engine.engine import LLMEngine
from workers.engine.kv_stream import KVStreamCursor, KVStreamHook
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import ScheduledBatch
from workers.engine.sequence import Sequence, SequenceStatus
from workers.engine.stage_driver import StageDriver
from workers.errors import NoCapacity
from workers.model.parallel import ParallelContext


class PrefillEngine(LLMEngine):
    """The prefill role's engine (see the module doc)."""

    def __init__(self, config: EngineConfig, parallel: ParallelContext | None = None,
                 driver: StageDriver | None = None):
        super().__init__(config, parallel, driver)
        self.kv_stream: KVStreamHook | None = None
        """The streaming KV transport's hook once attached (workers/engine/kv_stream.py)."""
        self._kv_cursor = KVStreamCursor()

    def attach_kv_stream(self, hook: KVStreamHook) -> None:
        """From now on every step streams its KV through `hook` (before_step, then
        layer_done per layer) and runs alone: no micro-batches. Called once, before the
        first step (the transport is built from this engine's caches, after it)."""
        if self.micro is not None and self.micro.busy:
            raise RuntimeError("a KV stream attached with micro-batches in flight")
        self.kv_stream = hook
        self.micro = None
        self._next_batch = self._run_streamed_batch

    def held_block_ids(self, request_id: str) -> list[int]:
        """The blocks holding a prefill_done request's prompt KV, in order."""
        return list(self.requests.in_status(request_id, SequenceStatus.HELD).block_table)

    def skip_remote_prefix(self, request_id: str, num_tokens: int) -> None:
        """The decode worker already holds the KV of the first `num_tokens` tokens (whole
        blocks), so the KV stream of `request_id` starts after them."""
        self._kv_cursor.skip(request_id, num_tokens)

    def release(self, request_id: str) -> None:
        """Frees a held request's blocks once its KV transfer is done or failed. Idempotent,
        like abort."""
        self.abort(request_id)

    def _run_streamed_batch(self) -> tuple[ScheduledBatch, torch.Tensor] | None:
        """`_run_batch` with the batch's KV streamed layer by layer."""
        batch = self._schedule()
        if batch is None:
            return None
        stream = self.kv_stream
        if batch.preempted:
            stream.fence()  # freed blocks may be rewritten: after the sends reading them
        stream.before_step(self._kv_cursor.spans(batch))
        return batch, self.driver.execute(batch.step, layer_done=stream.layer_done)

    def _finish(self, seq: Sequence, reason: str, free_blocks: bool) -> None:
        super()._finish(seq, reason, free_blocks)
        self._kv_cursor.forget(seq.seq_id)


class DecodeEngine(LLMEngine):
    """The decode role's engine (see the module doc)."""

    def reserve_remote(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        priority: int = 0, output_token_ids: Seq[int] = (), sent_text_len: int = 0,
    ) -> list[int]:
        """Allocates blocks for the prompt (and a continuation's known output) plus the next
        token's slot and returns their ids (the prefill worker writes the KV there). Raises
        NoCapacity when the pool is short, or the typed input errors of add_request.
        `priority` ranks the sequence once it runs (preemption order).

        With prefix caching, the leading blocks already cached here are shared, not
        reserved: `reserved_cached_tokens` says how many tokens they hold (the prefill
        worker sends only the blocks after them)."""
        seq = self.requests.new(request_id, prompt_token_ids, params, priority,
                                output_token_ids)
        self.scheduler.share_cached_prefix(seq)
        if not self.pool.can_append_slots(seq.block_table, seq.num_tokens + 1):
            needed = blocks_for(seq.num_tokens + 1, self.pool.block_size)
            self.pool.release(seq.block_table)
            raise NoCapacity(needed_blocks=needed, free_blocks=self.pool.num_free)
        self.requests.admit(seq, sent_text_len)
        self.pool.append_slots(seq.block_table, seq.num_tokens + 1)
        self.scheduler.count_reserved_lookup(seq)
        seq.status = SequenceStatus.RESERVED
        return list(seq.block_table)

    def reserved_cached_tokens(self, request_id: str) -> int:
        """Leading tokens of a reservation whose KV this engine already holds (a multiple of
        the block size; the KV transfer skips them)."""
        return self.requests.in_status(request_id, SequenceStatus.RESERVED).num_computed_tokens

    def commit_remote(self, request_id: str, first_token_id: int,
                      num_cached_tokens: int = 0) -> None:
        """The prompt's KV is in the reserved blocks; the sequence joins the running batch
        and its next step decodes from `first_token_id`. `num_cached_tokens`: what the
        prefill worker found in its cache (reported in this engine's outputs)."""
        seq = self.requests.in_status(request_id, SequenceStatus.RESERVED)
        self.check.first_token(first_token_id)
        now = time.monotonic()
        seq.times.first_scheduled = seq.times.first_token = now
        self.scheduler.cache_computed_blocks(seq, 0, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        seq.num_cached_tokens = num_cached_tokens
        seq.output_token_ids.append(first_token_id)
        text = self.requests.text(request_id)
        if text is not None:
            text.add(first_token_id)
            text.mark_sent()  # the prefill worker already streamed token 1's text
        self.scheduler.join_running(seq)


def build_engine(config: EngineConfig, parallel: ParallelContext | None = None,
                 driver: StageDriver | None = None) -> LLMEngine:
    """The engine of `config.role`: PrefillEngine, DecodeEngine, or LLMEngine (colocated)."""
    roles = {"prefill": PrefillEngine, "decode": DecodeEngine}
    return roles.get(config.role, LLMEngine)(config, parallel, driver)
