"""`LLMEngine`: one worker's engine — scheduler, model runner, sampler, stop checks.

`step()` is three calls (nano-vllm): `scheduler.schedule()` -> `driver.execute(step)` ->
sample + `scheduler.postprocess`, then each sampled sequence is checked for a stop and
reported as a `RequestOutput`. The public surface is the "Engine API" of docs/contracts.md,
which the cluster's worker actors call; everything here runs in-process without Ray.
`driver` is a StageDriver (workers/engine/stage_driver.py): the runner of this rank, which
hands each step to the other ranks of a TP/PP group.

Disaggregation (EngineConfig.role): the prefill and decode roles' engines add the hooks of
KV transfer to this one (workers/engine/role_engines.py, `build_engine`).

Pipeline parallel (pp_size > 1, no speculation, no per-layer KV stream): `step()` keeps up
to pp_size micro-batches in flight (workers/engine/micro_batches.py); it submits one and
returns the outputs of the oldest once the pipeline is full. Which way a step runs is fixed
when the engine is built (or a KV stream attached): `_next_batch`.

Speculative decoding (EngineConfig.speculative, workers/spec/): before each schedule the
proposer drafts tokens for the decoding sequences; the step verifies them in the same target
forward and a sequence may gain several tokens (one RequestOutput with all of them).

Continuation (a request migrated after its worker was lost): `add_request` and the decode
role's `reserve_remote` take the output the client already got; the sequence starts with
those tokens as output (prefilled with the prompt, counted for stop strings, max_tokens,
penalties and the seeded sampler's position) and its text as already sent.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from workers.config import EngineConfig
from workers.engine.block_pool import BlockPool
from workers.engine.micro_batches import MicroBatches
from workers.engine.model_runner import ModelRunner
from workers.engine.outputs import RequestMetrics, RequestOutput
from workers.engine.prefix_cache import PrefixCache, cache_root
from workers.engine.request_check import RequestCheck
from workers.engine.request_table import RequestTable
from workers.engine.sampler import Sampler
from workers.engine.sampling_params import SamplingParams
from workers.engine.sampling_rows import SamplingRows
from workers.engine.scheduler import ScheduledBatch, Scheduler
from workers.engine.sequence import Sequence, SequenceStatus
from workers.engine.stage_driver import StageDriver
from workers.engine.stop_checker import StopChecker
from workers.errors import InvalidParameter, KvrelayError
from workers.model.parallel import ParallelContext
from workers.spec.factory import build_speculative_decoder
from workers.text.request_text import load_tokenizer


class LLMEngine:
    """Owns one ModelRunner and the request state around it. Not thread-safe: one caller
    (the worker's loop thread) drives add_request/step/abort."""

    def __init__(self, config: EngineConfig, parallel: ParallelContext | None = None,
                 driver: StageDriver | None = None):
        """`driver`: built by the caller (a TP/PP group's driver rank, its runner and step
        channel, workers/actors/rank_group.py); by default one runner built from `config`."""
        self.config = config
        self.driver = driver or StageDriver(ModelRunner(config, parallel))
        self.runner = self.driver.runner
        self.model_config = self.runner.model_config
        self.tokenizer = load_tokenizer(config)
        self.pool = BlockPool(self.runner.num_blocks, self.runner.block_size,
                              self._make_prefix_cache())
        self.scheduler = Scheduler(config.scheduler, self.pool)
        self.sampler = Sampler(self.runner.device, seed=config.seed)
        # A sequence can never outgrow the whole pool, so that is a context limit too.
        pool_tokens = self.pool.num_blocks * self.pool.block_size
        self.max_model_len = min(self.runner.max_model_len, pool_tokens)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.model_config.eos_token_ids
        self.stop_checker = StopChecker(tuple(eos), self.max_model_len)
        self.check = RequestCheck(self.model_config.vocab_size, self.max_model_len,
                                  config.scheduler.policy, self.tokenizer is not None)
        self.rows = SamplingRows(self.runner.device, self.stop_checker)
        self.requests = RequestTable(self.check, self.tokenizer, self.rows)
        self._generate_ids = itertools.count()
        self.spec = build_speculative_decoder(config, self.runner, self.pool,
                                              self.max_model_len, self.tokenizer)
        """None unless this engine speculates (colocated or decode role with a method)."""
        self.micro = (MicroBatches(self.scheduler, self.driver, self._mark_scheduled)
                      if self.driver.pipeline_depth > 1 and self.spec is None else None)
        """Pipeline parallel: micro-batches in flight (workers/engine/micro_batches.py)."""
        self._next_batch: Callable[[], tuple[ScheduledBatch, torch.Tensor] | None] = (
            self.micro.advance if self.micro is not None else self._run_batch)
        """The next batch run and its logits (None: nothing to run yet), for `step`."""

    # ---- pool facts (leak tests, KV-aware routing) ---------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.runner.kv_caches

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or (self.micro is not None and self.micro.busy)

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.pool.prefix_cache

    def _make_prefix_cache(self) -> PrefixCache | None:
        """The cache's root names what besides tokens makes KV differ: model, KV dtype,
        block size (workers comparing names must agree on all three)."""
        if not self.config.cache.enable_prefix_caching:
            return None
        kv_dtype = str(self.runner.kv_caches[0][0].dtype).removeprefix("torch.")
        return PrefixCache(cache_root(Path(self.config.model).name, kv_dtype,
                                      self.runner.block_size))

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        output_token_ids: Seq[int] = (),
        sent_text_len: int = 0,
    ) -> None:
        """Queues a request (a continuation: with the output the client already got, see
        the module doc). Raises a typed error (nothing is queued) for bad input."""
        seq = self.requests.new(request_id, prompt_token_ids, params, priority,
                                output_token_ids)
        self.requests.admit(seq, sent_text_len)
        self.scheduler.add(seq)

    def abort(self, request_id: str, hold_blocks: bool = False) -> None:
        """Ends a request in any phase (waiting, running, reserved, held) and frees its
        blocks; with `hold_blocks` it stops running but keeps them (HELD) until `release`,
        for blocks a KV transfer still touches. Unknown or finished ids are ignored."""
        seq = self.requests.get(request_id)
        if seq is None or (hold_blocks and seq.status is SequenceStatus.HELD):
            return
        self.scheduler.remove(seq)
        self._finish(seq, "abort", free_blocks=not hold_blocks)

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch; returns an output per sequence that sampled a token."""
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        done = self._next_batch()
        if done is None:
            return []
        batch, logits = done
        token_ids, logprobs = self._sample(batch, logits)
        if self.spec is not None:
            self.spec.observe(batch.sampled, token_ids, self.runner.last_hidden)
        self.scheduler.postprocess(batch, token_ids)
        return [
            self._after_tokens(seq, len(new), new_logprobs)
            for seq, new, new_logprobs in zip(batch.sampled, token_ids, logprobs, strict=True)
        ]

    def generate(
        self,
        prompts: Seq[str] | Seq[list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs prompts (text or token ids) to completion; final outputs in prompt order."""
        params = params or SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        ids: list[str] = []
        try:
            for prompt, prompt_params in zip(prompts, per_prompt, strict=True):
                request_id = f"generate-{next(self._generate_ids)}"
                token_ids = self._encode(prompt) if isinstance(prompt, str) else list(prompt)
                self.add_request(request_id, token_ids, prompt_params)
                ids.append(request_id)
        except KvrelayError:
            for request_id in ids:  # all or nothing: no half-submitted batch stays queued
                self.abort(request_id)
            raise
        finals: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            finals.update({o.request_id: o for o in self.step() if o.finished})
        return [finals[request_id] for request_id in ids]

    # ---- internals ------------------------------------------------------------------------

    def _mark_scheduled(self, batch: ScheduledBatch) -> None:
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.times.first_scheduled is None:
                seq.times.first_scheduled = now

    def _schedule(self) -> ScheduledBatch | None:
        """The next batch scheduled (over every sequence: no micro-batches), or None."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return None
        self._mark_scheduled(batch)
        return batch

    def _run_batch(self) -> tuple[ScheduledBatch, torch.Tensor] | None:
        """One step at a time: the next batch and its logits."""
        batch = self._schedule()
        return None if batch is None else (batch, self.driver.execute(batch.step))

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor
                ) -> tuple[list[list[int]], list[list[dict | None]]]:
        """Per sampled sequence: its new tokens (one; or a verification run's accepted drafts
        plus one) and their logprob entries."""
        if not batch.sampled:
            return [], []
        if self.spec is not None and any(seq.spec_token_ids for seq in batch.sampled):
            rows = [self.rows.row(seq, drafts)
                    for seq in batch.sampled for drafts in self.spec.draft_prefixes(seq)]
            result = self.spec.verify(self.sampler, logits, batch.sampled, rows)
            return result.token_ids, result.logprobs
        out = self.sampler(logits, [self.rows.row(seq) for seq in batch.sampled])
        return [[t] for t in out.token_ids], [[lp] for lp in out.logprobs]

    def _after_tokens(self, seq: Sequence, num_new: int, logprobs: list[dict | None]
                      ) -> RequestOutput:
        """Stop checks (token by token: a verification run may stop half-way, the rest of
        its tokens dropped), text, and the role's finish rule for seq's newest tokens."""
        if seq.times.first_token is None:
            seq.times.first_token = time.monotonic()
        text = self.requests.text(seq.seq_id)
        new = seq.output_token_ids[-num_new:]
        del seq.output_token_ids[-num_new:]
        kept = 0
        for token_id in new:
            previous_len = len(text.text) if text else 0
            seq.output_token_ids.append(token_id)
            kept += 1
            if text is not None:
                text.add(token_id)
            decision = self.stop_checker.check(seq, text.text if text else "", previous_len)
            if text is not None:
                text.cut(len(decision.text))
            if decision.finish_reason is not None:
                break
        reason = decision.finish_reason
        if reason is None and self.config.role == "prefill":
            reason = "prefill_done"
        if text is None:
            delta = ""
        elif reason == "prefill_done":
            delta = text.take_handoff()
        else:
            delta = text.take_delta(finished=reason is not None)
        sent_text = text.sent_text if text else ""
        spec = self.spec.request_stats(seq.seq_id) if self.spec is not None else None
        if reason is not None:
            self.scheduler.remove(seq)
            self._finish(seq, reason, free_blocks=reason != "prefill_done")
        new_logprobs = [lp for lp in logprobs[:kept] if lp is not None]
        return RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=new[:kept],
            token_ids=list(seq.output_token_ids),
            text_delta=delta,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            text=sent_text,
            logprobs=new_logprobs or None,
            metrics=RequestMetrics.from_times(seq.times, time.monotonic(), seq.num_preemptions,
                                              spec.to_dict() if spec is not None else {}),
        )

    def _finish(self, seq: Sequence, reason: str, free_blocks: bool) -> None:
        seq.finish_reason = reason
        seq.times.finished = time.monotonic()
        self.requests.finish(seq.seq_id, held=not free_blocks)
        if self.spec is not None:
            self.spec.forget(seq.seq_id)
        if free_blocks:
            if self.micro is not None:  # in flight: freed once its batch is back
                self.micro.release_blocks(seq)
            else:
                self.pool.release(seq.block_table)
            seq.status = SequenceStatus.FINISHED
        else:
            seq.status = SequenceStatus.HELD

    def _encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameter("prompt", "text prompts need a tokenizer; this model has none")
        return self.tokenizer.encode(prompt)
