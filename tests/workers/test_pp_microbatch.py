"""Pipeline micro-batches (workers/engine/micro_batches.py): the scheduler forms batches over
sequences not in flight, with an even share of the running ones; two stages over gloo hold
different micro-batches at the same time (stage 1 is inside micro-batch n while stage 0
starts n + 1: recorded by each stage, no clock), with logits equal to one rank's."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine.block_pool import BlockPool
from workers.engine.model_runner import ModelRunner
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence, SequenceTimes
from workers.engine.stage_driver import StageDriver
from workers.model.parallel import ParallelContext

NUM_STEPS = 4
WAIT_S = 60.0
"""How long stage 1 waits, inside a micro-batch, for stage 0 to start the next one: never
reached when the stages overlap; a serial pipeline fails the test after it."""


def _scheduler(num_seqs: int, num_blocks: int = 64) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=64), BlockPool(num_blocks, 4))
    for i in range(num_seqs):
        scheduler.add(Sequence(f"s{i}", [1, 2, 3], SamplingParams(), i,
                               SequenceTimes(arrival=0.0)))
    return scheduler


def _decode_all(scheduler: Scheduler) -> None:
    """One step over everything, then the prompts are done: every sequence decodes next."""
    batch = scheduler.schedule()
    scheduler.postprocess(batch, [7] * len(batch.sampled))


def test_micro_batches_take_disjoint_even_shares_of_the_running_sequences():
    scheduler = _scheduler(16)
    _decode_all(scheduler)
    first = scheduler.schedule(frozenset(), num_microbatches=2)
    ids = {seq.seq_id for seq in first.seqs}
    assert len(ids) == 8
    second = scheduler.schedule(ids, num_microbatches=2)
    assert len(second.seqs) == 8 and not ids & {seq.seq_id for seq in second.seqs}
    everything = scheduler.schedule(ids | {seq.seq_id for seq in second.seqs}, 2)
    assert everything.is_empty


def test_one_micro_batch_is_the_whole_step_as_before():
    scheduler = _scheduler(16)
    _decode_all(scheduler)
    assert len(scheduler.schedule().seqs) == 16


def test_sequences_in_flight_are_never_preempted():
    # 4 sequences of 3 tokens fill 4 of 5 blocks; each needs a second block for token 5.
    scheduler = _scheduler(4, num_blocks=5)
    _decode_all(scheduler)
    for seq in scheduler.running:  # token 5 needs a new block for everyone
        seq.output_token_ids.append(7)
        seq.num_computed_tokens += 1
    in_flight = {"s2", "s3"}  # the lowest ranked: the victims without micro-batches
    batch = scheduler.schedule(in_flight, num_microbatches=2)
    assert not in_flight & {seq.seq_id for seq in batch.preempted}
    assert {seq.seq_id for seq in batch.seqs} | {s.seq_id for s in batch.preempted} <= \
        {"s0", "s1"}
    assert {seq.seq_id for seq in scheduler.running} >= in_flight


class RecordingRunner(ModelRunner):
    """A real runner whose stage forward records which micro-batch each stage holds: stage
    0 marks each start in a file; stage 1, inside micro-batch n, waits for stage 0 to start
    n + 1 and records whether it did."""

    def __init__(self, config, parallel, folder: str):
        super().__init__(config, parallel)
        self.folder = folder
        self.started = 0
        self.overlaps: list[tuple[int, int]] = []

    def forward_stage(self, step, intermediate=None, layer_done=None):
        n, self.started = self.started, self.started + 1
        if self.parallel.is_first_stage:
            open(os.path.join(self.folder, f"stage0-{n}"), "w").close()
        elif n + 1 < NUM_STEPS:
            deadline = time.monotonic() + WAIT_S
            marker = os.path.join(self.folder, f"stage0-{n + 1}")
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.01)
            if os.path.exists(marker):
                self.overlaps.append((n, n + 1))  # stage 1 holds n, stage 0 holds n + 1
        return super().forward_stage(step, intermediate, layer_done)


def _pp_rank(rank: int, model_dir: str, steps, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdzv", rank=rank,
                            world_size=2)
    try:
        config = EngineConfig(model=model_dir, device="cpu", pp_size=2,
                              cache=CacheConfig(block_size=4, num_blocks=32))
        runner = RecordingRunner(config, ParallelContext(pp_rank=rank, pp_size=2), folder)
        if rank == 0:
            # The engine's order (MicroBatches.advance): submit, submit, collect, submit, ...
            driver = StageDriver(runner)
            logits, depths = [], []
            driver.submit(steps[0])
            for step in steps[1:]:
                driver.submit(step)
                depths.append(driver.num_in_flight)
                logits.append(driver.collect())
            logits.append(driver.collect())
            torch.save({"logits": logits, "depths": depths}, f"{folder}/driver.pt")
        else:
            for step in steps:
                runner.run_pipeline(step)
            with open(f"{folder}/stage1.json", "w") as out:
                json.dump(runner.overlaps, out)
    finally:
        dist.destroy_process_group()


def test_two_stages_hold_different_micro_batches_at_once(tiny_model_dir, make_step, tmp_path):
    prompts = [[3, 99, 250, 17, 8], [41, 77, 120], [5, 6, 7, 8, 9, 10, 11], [300, 2]]
    steps = [make_step([(tokens, len(tokens), [2 * i, 2 * i + 1])], 4)
             for i, tokens in enumerate(prompts)]
    single = ModelRunner(EngineConfig(model=str(tiny_model_dir), device="cpu",
                                      cache=CacheConfig(block_size=4, num_blocks=32)))
    expected = [single.execute(step) for step in steps]
    mp.spawn(_pp_rank, args=(str(tiny_model_dir), steps, str(tmp_path)), nprocs=2, join=True)
    driver = torch.load(tmp_path / "driver.pt")
    assert driver["depths"] == [2] * (NUM_STEPS - 1)
    overlaps = json.loads((tmp_path / "stage1.json").read_text())
    assert overlaps == [[n, n + 1] for n in range(NUM_STEPS - 1)]
    for got, want in zip(driver["logits"], expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
